"""Optional dependencies: import one, or say which extra installs it.

``pip install penwatch`` brings only the light core (jax, optax, numpy,
prometheus-client, opentelemetry-api). Everything else is an extra (SPEC section 14):

* ``dashboard``: streamlit (``penwatch dashboard``, ``penwatch demo``'s dashboard);
* ``otlp``: opentelemetry-sdk and the OTLP/HTTP exporter (the CLI's span export);
* ``tensorboard``: tensorboardX (``pw.sinks.TensorBoard``);
* ``mlflow``: mlflow-skinny (``pw.sinks.MLflow``);
* ``wandb``: wandb (``pw.sinks.WandB``);
* ``progress``: tqdm (``pw.trainer(progress=True)``);
* ``all``: every one of them.

Every place that needs an optional module goes through :func:`require`, so a missing one
fails the same way: an :class:`MissingExtraError` (an ``ImportError``) naming the feature,
the module and the command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "available", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "dashboard": ("streamlit",),
    "otlp": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
    "tensorboard": ("tensorboardX",),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
    "progress": ("tqdm",),
}
"""Each extra and the top-level modules it provides (``pyproject.toml`` declares them)."""


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or broken
        return False


def require(module: str, *, extra: str, feature: str, load: bool = True) -> ModuleType | None:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    Args:
      module: the dotted module name (``"streamlit"``, ``"mlflow.tracking"``).
      extra: the penwatch extra that installs it (a key of :data:`EXTRAS`).
      feature: what the user asked for, shown in the message (``"pw.sinks.MLflow"``).
      load: import the module and return it; ``False`` only checks that it is there
        (for a module another process imports, like Streamlit) and returns None.

    Raises:
      MissingExtraError: ``feature needs the 'extra' extra (module 'x' is not
      installed): pip install 'penwatch[extra]'``.
    """
    if extra not in EXTRAS:
        raise ValueError(
            f"penwatch._extras.require: option 'extra' must be one of {sorted(EXTRAS)}, "
            f"got {extra!r}"
        )
    if not load:
        if available(module):
            return None
        raise _missing(module, extra, feature, None)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, extra, feature, exc) from exc


def _missing(module: str, extra: str, feature: str, exc: ImportError | None) -> MissingExtraError:
    why = f"module {module!r} is not installed" if exc is None else f"{type(exc).__name__}: {exc}"
    return MissingExtraError(
        f"{feature} needs the {extra!r} extra ({why}): pip install 'penwatch[{extra}]'"
    )
