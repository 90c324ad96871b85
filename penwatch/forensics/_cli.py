"""``penwatch replay CAPSULE --step-fn module:function``: the replay on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import sys
from typing import Any

from penwatch.forensics._replay import load, replay

__all__ = ["add_replay_parser", "replay_command"]

_HELP = """\
Re-run the step saved in a capsule (a directory written with nan_capsule=DIR) and name
where its first non-finite value was produced: the primitive, the source line, the pass
(forward/backward) and the loss term; check that it reproduces the recorded counts.
--step-fn names the step function that ran, as module:name, where name is the step
function itself or a function callable without arguments returning it (e.g. one that rebuilds the
model and calls pw.build_train_step); the module is imported from the current
directory or PYTHONPATH.
"""


def add_replay_parser(sub: Any) -> None:
    """Add the ``replay`` subcommand to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "replay",
        help="name the line that made a captured step non-finite",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("capsule", help="the capsule directory (DIR/step_XXXXXXXX)")
    p.add_argument("--step-fn", required=True, metavar="MODULE:NAME")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _resolve(spec: str) -> Any:
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--step-fn must be 'module:name', got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    obj: Any = importlib.import_module(module_name)
    for part in name.split("."):
        obj = getattr(obj, part)
    try:  # a factory: callable without arguments (every parameter has a default)
        factory = all(
            p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in inspect.signature(obj).parameters.values()
        )
    except (TypeError, ValueError):
        factory = False
    return obj() if factory else obj


def replay_command(args: argparse.Namespace) -> int:
    """Run ``penwatch replay``; 0 when the replay reproduced the recorded values."""
    try:
        step_fn = _resolve(args.step_fn)  # first: the structure may name its functions
        capsule = load(args.capsule)
    except (OSError, ValueError, ImportError, AttributeError) as e:
        print(f"penwatch replay: {e}", file=sys.stderr)
        return 2
    report = replay(capsule, step_fn)
    if args.json:
        data = dataclasses.asdict(report)
        data["pass"] = data.pop("pass_")
        print(json.dumps(data, indent=1, default=str))
    else:
        print(f"capsule {capsule.path}")
        print(report)
    return 0 if report.reproduced else 1
