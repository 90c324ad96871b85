"""NaN forensics (SPEC section 13): capsules of the first non-finite step, and replay.

``CapsuleWriter`` keeps the exact inputs of the first non-finite step of each episode
(``nan_capsule=DIR`` in the train-step builders and ``pw.trainer``); ``replay`` re-runs
such a step and names the primitive, the source line, the pass and the loss term that
produced the first non-finite value.
"""

from penwatch.forensics._capsule import FORMAT as FORMAT
from penwatch.forensics._capsule import CapsuleWriter as CapsuleWriter
from penwatch.forensics._capsule import capsule_dir_name as capsule_dir_name
from penwatch.forensics._capsule import replay_command as replay_command
from penwatch.forensics._capsule import step_report as step_report
from penwatch.forensics._replay import Capsule as Capsule
from penwatch.forensics._replay import Frame as Frame
from penwatch.forensics._replay import Replay as Replay
from penwatch.forensics._replay import Replayable as Replayable
from penwatch.forensics._replay import load as load
from penwatch.forensics._replay import replay as replay

__all__ = [
    "FORMAT",
    "Capsule",
    "CapsuleWriter",
    "Frame",
    "Replay",
    "Replayable",
    "capsule_dir_name",
    "load",
    "replay",
    "replay_command",
    "step_report",
]
