"""The NFNet family as Haiku modules, and the facts the rest of the project dispatches on.

Modules: `nfnet` (NFNet-F0..F7, F0+..F7+), `nfresnet` (NF-ResNets), `variants` (the variant
tables), `registry` (model names -> classes, per-variant defaults, the classifier weight, the
one forward builder), `layers` (scaled WS conv, squeeze-excite, stochastic depth),
`conv_grad` (matrix-product convolution gradients), `activations` (scaled activations),
`counting` (parameters and MACs), `signal_prop` (signal propagation at initialisation).
"""
