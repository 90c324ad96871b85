"""Gradient diagnostics: which term of the loss drives the parameter update (SPEC §4),
and what weight it should have (SPEC §12)."""

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

from penwatch.diagnostics._update import diagonal_preconditioner as diagonal_preconditioner
from penwatch.diagnostics._whatif import Suggestion as Suggestion
from penwatch.diagnostics._whatif import WhatIf as WhatIf
from penwatch.diagnostics._whatif import suggest_weights as suggest_weights
from penwatch.diagnostics._whatif import suggested_weight_metrics as suggested_weight_metrics
from penwatch.diagnostics._whatif import what_if as what_if

__all__ = [
    "DiagnosticsResult",
    "ParamTerm",
    "Suggestion",
    "WhatIf",
    "diagonal_preconditioner",
    "elastic_net_term",
    "gradient_diagnostics",
    "l1_term",
    "l2_term",
    "pipeline_diagnostics",
    "pipeline_terms_fn",
    "suggest_weights",
    "suggested_weight_metrics",
    "term_names",
    "value_and_grad_with_diagnostics",
    "what_if",
]
