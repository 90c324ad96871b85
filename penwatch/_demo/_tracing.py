"""OpenTelemetry SDK set-up for the CLI (the library itself only uses the API).

OTLP/HTTP is configured only when the standard variables ask for it
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_TRACES_EXPORTER``); the exporter reads the ``OTEL_EXPORTER_OTLP_*`` variables
(endpoint, headers, timeout, compression) itself. ``service.name`` defaults to
``penwatch`` unless ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` set it.

The SDK and the exporter come with the ``otlp`` extra; they are imported only when
tracing is configured, and a missing one raises an error naming the extra.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from penwatch import _extras

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = [
    "SHUTDOWN_TIMEOUT",
    "CountingExporter",
    "configure_tracing",
    "shutdown_tracing",
    "tracing_requested",
]

SHUTDOWN_TIMEOUT = 2.0
"""Seconds :func:`shutdown_tracing` waits for the last export (SPEC section 11)."""

logger = logging.getLogger("penwatch.demo")

_REQUEST_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
)


def _sdk(what: str) -> Any:
    """The ``opentelemetry.sdk.trace.export`` module, or an error naming the extra."""
    _extras.require("opentelemetry.sdk.trace", extra="otlp", feature=what)
    from opentelemetry.sdk.trace import export

    return export


class CountingExporter:
    """Wraps an exporter and counts exported and failed spans (lost spans are visible).

    A ``SpanExporter`` (by its methods) for the SDK's ``BatchSpanProcessor``. The first
    failed export is logged (the exporter's own retries have given up by then); later
    ones are counted only.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        self._result = _sdk("penwatch's span counting").SpanExportResult
        self.exporter = exporter
        self.exported = 0
        self.failed = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception:  # an exporter bug must not kill the batch processor
            logger.exception("span exporter raised")
            result = self._result.FAILURE
        with self._lock:
            if result == self._result.SUCCESS:
                self.exported += len(spans)
            else:
                if not self.failed:
                    logger.warning(
                        "could not export %d spans (is the OTLP collector up?); counting "
                        "lost spans from now on",
                        len(spans),
                    )
                self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for trace export (and not ``none``)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(name) for name in _REQUEST_VARS)


def configure_tracing(
    *, service_name: str = "penwatch", exporter: SpanExporter | None = None
) -> tuple[TracerProvider, CountingExporter] | None:
    """An SDK ``TracerProvider`` exporting in batches, or None when nobody asked.

    Args:
      service_name: ``service.name`` unless the environment sets one.
      exporter: export to this instead of what ``OTEL_TRACES_EXPORTER`` names
        (``otlp`` over HTTP by default, or ``console``).

    Returns:
      ``(provider, counting_exporter)``; call :func:`shutdown_tracing` at the end.
    """
    if exporter is None and not tracing_requested():
        return None
    export = _sdk("OpenTelemetry tracing (OTEL_* variables)")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    if exporter is None:
        kinds = [
            k.strip().lower() for k in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        ]
        if "console" in kinds:
            exporter = export.ConsoleSpanExporter()
        else:
            otlp = _extras.require(
                "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                extra="otlp",
                feature="OTLP span export (OTEL_* variables)",
            )
            exporter = otlp.OTLPSpanExporter()  # endpoint, headers, timeout from OTEL_* variables
    env_names = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if env_names else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    counting = CountingExporter(exporter)
    provider.add_span_processor(export.BatchSpanProcessor(counting))
    return provider, counting


def shutdown_tracing(provider: TracerProvider, *, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
    """Flush and shut ``provider`` down, waiting at most ``timeout`` seconds.

    ``TracerProvider.shutdown`` exports what is batched and can wait for the exporter's
    own timeout (10 s for OTLP) and retries when the collector does not answer; a
    process stopping (SIGTERM) cannot wait that long. The shutdown runs on a daemon
    thread; spans it had not exported by the deadline are abandoned (the
    :class:`CountingExporter` counts what did fail).

    Returns:
      False when the deadline passed first.
    """
    done = threading.Event()

    def run() -> None:
        try:
            provider.shutdown()
        except Exception:  # pragma: no cover - the SDK logs its own errors
            logger.exception("penwatch: tracer provider shutdown failed")
        finally:
            done.set()

    threading.Thread(target=run, name="penwatch-otel-shutdown", daemon=True).start()
    if not done.wait(timeout):
        logger.warning(
            "penwatch: the span exporter did not finish within %.1fs (collector not "
            "answering?); remaining spans abandoned",
            timeout,
        )
        return False
    return True
