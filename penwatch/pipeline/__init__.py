"""Penalty composition: pipelines, multi-input pipelines, one-pass gradient norms (SPEC §3)."""

from penwatch.pipeline._core import RESERVED_NAMES as RESERVED_NAMES
from penwatch.pipeline._core import PipelineEntry as PipelineEntry
from penwatch.pipeline._grad_norms import grad_norms as grad_norms
from penwatch.pipeline._multi import MultiPipeline as MultiPipeline
from penwatch.pipeline._pipeline import Pipeline as Pipeline
from penwatch.pipeline._registry import builtin_penalties as builtin_penalties
from penwatch.pipeline._registry import multi_pipeline as multi_pipeline
from penwatch.pipeline._registry import pipeline as pipeline

__all__ = [
    "RESERVED_NAMES",
    "MultiPipeline",
    "Pipeline",
    "PipelineEntry",
    "builtin_penalties",
    "grad_norms",
    "multi_pipeline",
    "pipeline",
]
