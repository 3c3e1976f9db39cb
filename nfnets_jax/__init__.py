"""nfnets_jax: JAX + Haiku reference reimplementation of NFNets and AGC.

Packages and modules (docs/architecture.md has the full map): `models` (the NFNet family,
its variant tables and registry), `agc` (adaptive gradient clipping, an optax transform),
`treepaths` (parameter paths and masks), `optim` (the reference optimizer chain), `data`
(the input pipeline), `train` (the trainer), `checkpoints` (every checkpoint format),
`evaluation` and `predict`, `parallel` (device plumbing), `bench` (benchmarks).
"""

from nfnets_jax.agc import adaptive_grad_clip
from nfnets_jax.models.nfnet import NFNet
from nfnets_jax.models.nfresnet import NFResNet
from nfnets_jax.models.variants import NFNET as VARIANTS

__all__ = ["NFNet", "NFResNet", "VARIANTS", "adaptive_grad_clip"]
