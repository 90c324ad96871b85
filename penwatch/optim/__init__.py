"""Optax gradient transformations for regularization (the seed's Polaris integration).

Built on optax's own transforms where optax has one (``add_decayed_weights``,
``clip_by_global_norm``, ``add_noise``, ``adaptive_grad_clip``, ``centralize``); penwatch
adds L1 and elastic-net decay, coupled and decoupled (AdamW style).
"""

from penwatch.optim._decay import DecoupledDecayState as DecoupledDecayState
from penwatch.optim._decay import decoupled_elastic_net_decay as decoupled_elastic_net_decay
from penwatch.optim._decay import decoupled_l1_decay as decoupled_l1_decay
from penwatch.optim._decay import decoupled_l2_decay as decoupled_l2_decay
from penwatch.optim._decay import elastic_net_decay as elastic_net_decay
from penwatch.optim._decay import l1_decay as l1_decay
from penwatch.optim._helpers import add_adaptive_gradient_clipping as add_adaptive_gradient_clipping
from penwatch.optim._helpers import add_elastic_net_decay as add_elastic_net_decay
from penwatch.optim._helpers import add_gradient_centralization as add_gradient_centralization
from penwatch.optim._helpers import add_gradient_clipping as add_gradient_clipping
from penwatch.optim._helpers import add_gradient_noise as add_gradient_noise
from penwatch.optim._helpers import add_l1_decay as add_l1_decay
from penwatch.optim._helpers import add_l2_decay as add_l2_decay

__all__ = [
    "DecoupledDecayState",
    "add_adaptive_gradient_clipping",
    "add_elastic_net_decay",
    "add_gradient_centralization",
    "add_gradient_clipping",
    "add_gradient_noise",
    "add_l1_decay",
    "add_l2_decay",
    "decoupled_elastic_net_decay",
    "decoupled_l1_decay",
    "decoupled_l2_decay",
    "elastic_net_decay",
    "l1_decay",
]
