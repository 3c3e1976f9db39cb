"""The timm side of the step benchmark: timm's `dm_nfnet_f*` on the same batch and shape.

torch runs eagerly, so its "compile" time is the first, untimed call; bfloat16 runs under
`torch.autocast` (AMP); torch uses as many threads as this process has CPU cores. The
training step is forward, cross-entropy, backward and an SGD step (Nesterov momentum 0.9,
weight decay 2e-5); timm's has no AGC, label smoothing or EMA (ours has all three).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from nfnets_jax.bench import step, timing
from nfnets_jax.checkpoints import timm_convert
from nfnets_jax.models import registry

_LOG = logging.getLogger(__name__)


def available() -> tuple[bool, str]:
    """Whether timm can be imported, and why not."""
    try:
        timm_convert.import_timm()
    except Exception as err:  # noqa: BLE001 - any import failure means "not available".
        return False, f"timm is not importable: {type(err).__name__}: {err}"
    return True, ""


def make_model(config: step.BenchmarkConfig, is_training: bool) -> Any:
    """timm's equivalent of the configured NFNet (`dm_nfnet_f*`, random weights).

    Only "F0".."F7" exist in timm. Width/depth/group-width overrides (`model_kwargs`
    widths, depths, group_width) are applied to timm's config; the stem then keeps timm's
    layout with its width scaled like the first stage's.

    Raises:
      ValueError: if timm has no equivalent of the variant.
    """
    timm = timm_convert.import_timm()
    from timm.models import nfnet as timm_nfnet

    name = f"dm_nfnet_{config.variant.lower()}"
    if name not in timm_nfnet.model_cfgs:
        raise ValueError(f"timm has no {name!r} equivalent of variant {config.variant!r}.")
    mk = config.model_kwargs
    drop = mk.get("drop_rate")
    if drop is None:
        drop = registry.variant("NFNet", config.variant).drop_rate
    kwargs = dict(
        num_classes=config.num_classes,
        drop_rate=drop,
        drop_path_rate=mk.get("stochdepth_rate", 0.1),
    )
    if any(k in mk for k in ("widths", "depths", "group_width")):
        cfg = timm_nfnet.model_cfgs[name]
        channels = tuple(mk.get("widths", cfg.channels))
        cfg = dataclasses.replace(
            cfg,
            channels=channels,
            depths=tuple(mk.get("depths", cfg.depths)),
            group_size=mk.get("group_width", cfg.group_size),
            stem_chs=max(8, cfg.stem_chs * channels[0] // cfg.channels[0]),
            num_features=int(channels[-1] * 2),
        )
        model = timm_nfnet.NormFreeNet(cfg, **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.train(is_training)


def _call(mode: str, model: Any, images: Any, labels: Any, bf16: bool, sync: Any) -> Any:
    """One timm inference or training call (`carry -> carry`)."""
    import torch

    device_type = images.device.type
    if mode == "inference":

        def infer(carry: Any) -> Any:
            with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=bf16):
                out = model(images)
            sync()
            return out

        return infer
    sgd = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5
    )

    def train(carry: Any) -> Any:
        sgd.zero_grad(set_to_none=True)
        with torch.autocast(device_type, torch.bfloat16, enabled=bf16):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        sgd.step()
        sync()
        return loss.detach()

    return train


def prepare(
    config: step.BenchmarkConfig,
    config_index: int = 0,
    macs: dict[str, int] | None = None,
    channels_last: bool = False,
) -> list[step.Prepared]:
    """timm's "inference" and "train" measurements for `config`.

    Args:
      config: the benchmark configuration.
      config_index: its index in the run.
      macs: per-image forward MACs by mode (the JAX model's count, so FLOP/s compare);
        computed with `step.forward_macs` when not given.
      channels_last: NHWC memory format for the model and images.
    """
    import torch

    torch.set_num_threads(timing.cpu_cores())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    prepared = []
    for mode in (m for m in config.modes if m in ("inference", "train")):
        res = config.resolution(mode)
        torch.manual_seed(0)
        model = make_model(config, is_training=mode == "train").to(device, memory_format=fmt)
        images = torch.randn(config.batch_size, 3, res, res, device=device).to(memory_format=fmt)
        labels = torch.arange(config.batch_size, device=device) % config.num_classes
        call = _call(mode, model, images, labels, config.dtype == "bfloat16", sync)
        start = time.perf_counter()
        call(None)  # Eager: the first call stands in for compilation.
        seconds = time.perf_counter() - start
        _LOG.info("timm %s: first call %.1f s", mode, seconds)
        if device.type == "cuda":
            memory = (int(torch.cuda.max_memory_allocated()), "torch max_memory_allocated")
        else:
            memory = (timing.process_peak_rss(), "process peak RSS")
        prepared.append(
            step.Prepared(
                timing.Timed(f"timm {mode}", call),
                "timm",
                mode,
                config_index,
                config,
                seconds,
                (macs or {}).get(mode) or step.forward_macs(config, res),
                kind,
                memory=memory,
            )
        )
    return prepared
