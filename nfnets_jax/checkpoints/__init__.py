"""Every checkpoint format in one package, with one entry point (`loading`).

Modules:
  loading: `load_params` / `load` open any checkpoint (zoo name, released pickle, `.npz`,
    timm `.pth`, training workdir); `sniff_format` tells them apart.
  workdir: the trainer's orbax checkpoints (`Checkpointer`) and their parameters.
  zoo: the released F0-F6 files (URL, md5, variant, published accuracy), verified download.
  safe_pickle: a restricted unpickler (mappings, strings, numbers, numpy arrays only).
  released: the released pickle format and the pickle-free `.npz` format.
  timm_convert: timm `dm_nfnet_f*` state dicts <-> this project's parameters.
  tree: architecture and variant detection, validation against a requested variant.
  labels: the 1000 ImageNet class names.
  errors: the exceptions these modules raise.
"""
