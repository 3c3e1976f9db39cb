"""Checkpoints: the released F0-F6 model zoo, a safe loader for the released pickles, a
non-pickle `.npz` format, and conversion to and from timm's PyTorch weights.

Modules:
  zoo: the released files (URL, md5, variant, published accuracy) and a verified download.
  safe_pickle: a restricted unpickler (mappings, strings, numbers, numpy arrays only).
  released: the released format, the `.npz` format, and `load_params` for any checkpoint.
  tree: architecture and variant detection, validation against a requested variant.
  timm_convert: timm `dm_nfnet_f*` state dicts <-> this project's parameters.
  labels: the 1000 ImageNet class names.
  errors: the exceptions above modules raise.
"""
