"""nfnets_jax: JAX + Haiku reference reimplementation of NFNets and AGC."""
