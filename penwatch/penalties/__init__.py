"""Penalty primitives: pure JAX functions (SPEC section 2).

Norms (``l1``, ``l2``, ``elastic_net``), divergences (``kl_divergence``,
``js_divergence``, ``entropy``), constraints (``orthogonality``, ``consistency``),
gradient penalties (``gradient_penalty``, ``interpolated_gradient_penalty``,
``output_magnitude_penalty``) and NaN/Inf validation (``validate``, ``finite_report``).
"""

from penwatch.penalties._constraints import consistency as consistency
from penwatch.penalties._constraints import orthogonality as orthogonality
from penwatch.penalties._divergences import entropy as entropy
from penwatch.penalties._divergences import js_divergence as js_divergence
from penwatch.penalties._divergences import kl_divergence as kl_divergence
from penwatch.penalties._gradient import gradient_penalty as gradient_penalty
from penwatch.penalties._gradient import (
    interpolated_gradient_penalty as interpolated_gradient_penalty,
)
from penwatch.penalties._gradient import output_magnitude_penalty as output_magnitude_penalty
from penwatch.penalties._norms import elastic_net as elastic_net
from penwatch.penalties._norms import l1 as l1
from penwatch.penalties._norms import l2 as l2
from penwatch.penalties._validation import NonFiniteError as NonFiniteError
from penwatch.penalties._validation import Validation as Validation
from penwatch.penalties._validation import finite_report as finite_report
from penwatch.penalties._validation import leaf_finite_counts as leaf_finite_counts
from penwatch.penalties._validation import validate as validate

__all__ = [
    "NonFiniteError",
    "Validation",
    "consistency",
    "elastic_net",
    "entropy",
    "finite_report",
    "gradient_penalty",
    "interpolated_gradient_penalty",
    "js_divergence",
    "kl_divergence",
    "l1",
    "l2",
    "leaf_finite_counts",
    "orthogonality",
    "output_magnitude_penalty",
    "validate",
]
