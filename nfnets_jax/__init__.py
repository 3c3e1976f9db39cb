"""nfnets_jax: JAX + Haiku reference reimplementation of NFNets and AGC.

Modules: `nfnet` (NFNet-F0..F7, F0+..F7+), `nfresnet` (NF-ResNets), `layers` (scaled WS conv,
squeeze-excite, stochastic depth), `activations` (scaled activations), `counting`
(parameters and MACs), `signal_prop` (signal propagation at initialisation), `agc`
(adaptive gradient clipping, an optax transform), `optim` (the reference optimizer chain).
"""

from nfnets_jax.agc import adaptive_grad_clip
from nfnets_jax.nfnet import VARIANTS, NFNet
from nfnets_jax.nfresnet import NFResNet

__all__ = ["NFNet", "NFResNet", "VARIANTS", "adaptive_grad_clip"]
