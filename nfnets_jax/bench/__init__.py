"""Benchmarks: each times the code users run and prints a table; the scripts are thin.

Modules:
  timing: the shared round-robin timer, compilation with XLA's memory estimate, memory and
    peak-FLOP/s facts, the environment, text tables.
  step: inference and the trainer's own training step (`train.steps`), with `step_report`
    (rows, ratios, the table) and `timm_model` (timm's `dm_nfnet_f*` side by side).
  layers: every distinct convolution of a model, forward + backward, against torch.
  profile: where a compiled step spends its time, by kind of XLA operation.
  agc: AGC and the reference optimizer update on a real parameter tree.
  input: throughput of the training input pipeline.
"""
