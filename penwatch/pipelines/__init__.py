"""Penalty composition: pipelines, multi-input pipelines, one-pass gradient norms (SPEC §3)."""

from penwatch.pipelines._core import RESERVED_NAMES as RESERVED_NAMES
from penwatch.pipelines._core import PipelineEntry as PipelineEntry
from penwatch.pipelines._grad_norms import grad_norms as grad_norms
from penwatch.pipelines._multi import MultiPipeline as MultiPipeline
from penwatch.pipelines._pipeline import Pipeline as Pipeline
from penwatch.pipelines._registry import builtin_penalties as builtin_penalties
from penwatch.pipelines._registry import multi_pipeline as multi_pipeline
from penwatch.pipelines._registry import pipeline as pipeline

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
