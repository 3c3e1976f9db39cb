"""Input pipeline: sources, preprocessing, augmentation and batching for data parallelism.

Entry points live in `nfnets_jax.data.pipeline` (`train_iterator`, `eval_iterator`,
`dataset_info`); `nfnets_jax.parallel.prefetch_to_device` overlaps host-to-device copies
with compute. TensorFlow is imported lazily (only when a pipeline is built), so importing
this package, the model or AGC never needs TensorFlow.
"""
