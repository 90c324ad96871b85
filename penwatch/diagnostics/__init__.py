"""Gradient diagnostics: which term of the loss drives the parameter update (SPEC §4)."""

from penwatch.diagnostics._closed_form import ParamTerm as ParamTerm
from penwatch.diagnostics._closed_form import elastic_net_term as elastic_net_term
from penwatch.diagnostics._closed_form import l1_term as l1_term
from penwatch.diagnostics._closed_form import l2_term as l2_term
from penwatch.diagnostics._dominance import DiagnosticsResult as DiagnosticsResult
from penwatch.diagnostics._dominance import gradient_diagnostics as gradient_diagnostics
from penwatch.diagnostics._dominance import term_names as term_names
from penwatch.diagnostics._dominance import (
    value_and_grad_with_diagnostics as value_and_grad_with_diagnostics,
)
from penwatch.diagnostics._pipeline import pipeline_diagnostics as pipeline_diagnostics
from penwatch.diagnostics._pipeline import pipeline_terms_fn as pipeline_terms_fn

__all__ = [
    "DiagnosticsResult",
    "ParamTerm",
    "elastic_net_term",
    "gradient_diagnostics",
    "l1_term",
    "l2_term",
    "pipeline_diagnostics",
    "pipeline_terms_fn",
    "term_names",
    "value_and_grad_with_diagnostics",
]
