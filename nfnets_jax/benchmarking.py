"""Speed benchmarks: NFNet inference and training-step time, side by side with timm.

Every measurement is taken after compilation (compile time is reported separately), as the
median over `repeats` timed runs of `iters` calls each, with the outputs of each run
blocked on. All measurements of a run are compiled first and then timed round-robin, one
run of each per round, so that those compared share the same background load. A row
also reports images/s, peak memory (the device's `peak_bytes_in_use` where the backend
keeps memory statistics, else the process's peak RSS, which never decreases during a run),
the XLA memory estimate of the compiled executable, achieved FLOP/s (2 x the MACs of
`counting.model_counts`; a training step counts 3x the forward MACs) and, where the
device's peak is in `PEAK_FLOPS`, model-FLOP utilisation.

Modes:
- "init": the jitted parameter initialisation.
- "inference": forward pass, `is_training=False`.
- "train": one full training step: forward, backward of the mean softmax cross-entropy,
  AGC, weight decay and the Nesterov-SGD update (`optim.make_optimizer`), with the
  parameters and optimizer state donated.
- "grad": forward and backward only (no optimizer), to locate the optimizer's share.
- "optimizer": AGC + weight decay + SGD update alone on gradients of the parameters' shape.

With `compare_timm`, timm's `dm_nfnet_f*` is timed in the same process on the same batch,
resolution and dtype (torch thread count = JAX's CPU core count; eager mode, so "compile"
is the first, untimed call; bfloat16 via autocast), and the ratio JAX time / timm time is
reported per mode (ratio of medians, and the median of the per-round ratios).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax import counting, layers, nfnet, optim

MODES = ("init", "inference", "train", "grad", "optimizer")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Dense peak FLOP/s per JAX device, matched by substring of `device.device_kind` (first
# match wins). float32 on A100/H100/H200 is the TF32 tensor-core peak, which XLA uses for
# float32 convolutions and matmuls at default precision; V100 has no bfloat16 units; TPU
# float32 has no published peak. A TPU v3 JAX device is one core (half a chip); v4 and v5e
# devices are whole chips. CPUs have no entry (no utilisation is reported).
PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM; PCIe is ~25% lower.
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "V100": {"bfloat16": None, "float32": 15.7e12},
    "TPU v3": {"bfloat16": 61.5e12, "float32": None},
    "TPU v4": {"bfloat16": 275e12, "float32": None},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": None},
    "TPU v5e": {"bfloat16": 197e12, "float32": None},
}
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure.

    Attributes:
      variant: NFNet variant ("F0".."F7+").
      batch_size: images per call.
      inference_resolution: square image size for "init" and "inference".
      train_resolution: square image size for "train", "grad" and "optimizer".
      dtype: "float32" or "bfloat16" (bfloat16 compute on float32 parameters and optimizer
        state; the loss is taken in float32).
      group_conv: grouped-convolution strategy ("auto", "native", "split", "dense").
      conv_grad: convolution backward-pass implementation ("auto", "xla", "matmul").
      modes: a subset of `MODES`.
      iters: calls per timed run.
      repeats: timed runs; the median is reported.
      warmup: untimed calls after compilation.
      remat: rematerialise each residual block in the backward pass (jax.checkpoint per
        block: lower memory, about one more forward pass of compute).
      donate: donate parameters and optimizer state to the training step.
      num_classes: classifier outputs.
      model_kwargs: further `nfnet.NFNet` arguments (e.g. tiny widths/depths for tests).
    """

    variant: str = "F0"
    batch_size: int = 8
    inference_resolution: int = 192
    train_resolution: int = 128
    dtype: str = "float32"
    group_conv: str = "auto"
    conv_grad: str = "auto"
    modes: tuple[str, ...] = ("inference", "train")
    iters: int = 1
    repeats: int = 3
    warmup: int = 1
    remat: bool = False
    donate: bool = True
    num_classes: int = 1000
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"Unknown benchmark modes {bad}; valid: {', '.join(MODES)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}.")
        layers.resolve_group_conv(self.group_conv)
        layers.resolve_conv_grad(self.conv_grad)
        nfnet.check_variant(self.variant, nfnet.VARIANTS)
        for name in ("batch_size", "inference_resolution", "train_resolution", "iters", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def resolution(self, mode: str) -> int:
        """Image size used by `mode`."""
        return self.inference_resolution if mode in ("init", "inference") else self.train_resolution


# ------------------------------------------------------------------------------------------
# Device facts: peak FLOP/s, memory.
# ------------------------------------------------------------------------------------------


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of kind `device_kind` in `dtype`, None if unknown."""
    for key, peaks in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def jax_peak_memory(device: jax.Device | None = None) -> tuple[int, str]:
    """Peak memory in bytes and where it comes from.

    Device statistics where the backend keeps them (GPU/TPU, peak since process start),
    else the peak resident set size of this process (CPU; includes everything the process
    allocated, torch included, and never decreases).
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return process_peak_rss(), "process peak RSS"


def process_peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not Linux.
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    """A compiled measurement, ready to time: `carry = call(carry)`.

    Attributes:
      framework: "jax" or "timm".
      mode: one of `MODES`.
      config_index: which configuration of the run it belongs to.
      config: that configuration.
      call: one step; its output is fed back in (so donated buffers stay valid).
      carry: the current input of `call`.
      compile_s: compilation time (timm: the first, eager call).
      macs: per-image forward MACs.
      device_kind: the device it runs on.
      memory: (bytes, source) peak memory after compilation and warm-up.
      xla_memory_bytes: XLA's estimate for the compiled executable (arguments + outputs +
        temporaries - donated aliases), JAX only.
      times: seconds per call of each timed run, filled by `time_round_robin`.
    """

    framework: str
    mode: str
    config_index: int
    config: BenchmarkConfig
    call: Callable[[Any], Any]
    carry: Any
    compile_s: float
    macs: int
    device_kind: str
    memory: tuple[int, str] = (0, "")
    xla_memory_bytes: int | None = None
    times: list[float] = dataclasses.field(default_factory=list)


def time_once(call: Callable[[Any], Any], carry: Any, iters: int) -> tuple[float, Any]:
    """Seconds per call over `iters` calls of `carry = call(carry)`, and the last carry."""
    start = time.perf_counter()
    for _ in range(iters):
        carry = call(carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - start) / iters, carry


def time_round_robin(prepared: Sequence[Prepared], iters: int, repeats: int, warmup: int) -> None:
    """Warms up every measurement, then times them in turn, `repeats` rounds.

    Interleaving puts the measurements that are compared under the same background load
    (the machine may be shared); each round gives every measurement one timed run. The
    order rotates from round to round, so that no measurement always follows the same
    one (PyTorch's OpenMP threads spin for a while after a call and slow whatever runs
    next; see `layer_benchmark.run`).
    """
    for item in prepared:
        for _ in range(warmup):
            item.carry = jax.block_until_ready(item.call(item.carry))
        if item.framework == "jax":
            item.memory = jax_peak_memory()
    for round_index in range(repeats):
        shift = round_index % len(prepared)
        for item in list(prepared[shift:]) + list(prepared[:shift]):
            seconds, item.carry = time_once(item.call, item.carry, iters)
            item.times.append(seconds)
        _LOG.info(
            "round %d/%d: %s",
            round_index + 1,
            repeats,
            ", ".join(f"{p.framework} {p.mode} {p.times[-1]:.3g}s" for p in prepared),
        )


def _remat_blocks(next_f, args, kwargs, context):
    """Method interceptor: each NFBlock call under `hk.remat` (jax.checkpoint)."""
    if isinstance(context.module, nfnet.NFBlock) and context.method_name == "__call__":
        x, *rest = args  # Only the activations are traced; is_training stays static.
        return hk.remat(lambda y: next_f(y, *rest, **kwargs))(x)
    return next_f(*args, **kwargs)


def make_forward(config: BenchmarkConfig) -> Callable[..., dict[str, jax.Array]]:
    """`(images, is_training) -> NFNet outputs`, to be Haiku-transformed."""

    def forward(images: jax.Array, is_training: bool) -> dict[str, jax.Array]:
        model = nfnet.NFNet(
            num_classes=config.num_classes,
            variant=config.variant,
            group_conv=config.group_conv,
            conv_grad=config.conv_grad,
            **config.model_kwargs,
        )
        if config.remat and is_training:
            with hk.intercept_methods(_remat_blocks):
                return model(images, is_training=is_training)
        return model(images, is_training=is_training)

    return forward


def forward_macs(config: BenchmarkConfig, resolution: int) -> int:
    """Per-image forward MACs of the configured model (`counting.model_counts`)."""
    forward = make_forward(config)
    return counting.model_counts(lambda x: forward(x, False), resolution)["macs"]


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def make_train_step(
    transformed: hk.Transformed,
    optimizer: optax.GradientTransformation,
    compute_dtype: Any,
    with_update: bool = True,
) -> Callable[..., Any]:
    """The (unjitted) training step `(params, opt_state, images, labels, rng) -> ...`.

    Returns `(params, opt_state, loss)`; with `with_update=False` the gradients replace
    the parameters and no optimizer runs ("grad" mode).
    """

    def loss_fn(params, images, labels, rng):
        logits = transformed.apply(
            _cast(params, compute_dtype), rng, images.astype(compute_dtype), is_training=True
        )["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        ).mean()

    def step(params, opt_state, images, labels, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, rng)
        if not with_update:
            return grads, opt_state, loss
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _compile(
    fn: Callable[..., Any], args: Sequence[Any], donate_argnums: tuple[int, ...] = ()
) -> tuple[Any, float, int | None]:
    """AOT-compiles `fn`: (executable, seconds, XLA memory estimate in bytes or None)."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    seconds = time.perf_counter() - start
    try:
        m = compiled.memory_analysis()
        xla_bytes = int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - not every backend implements it.
        xla_bytes = None
    return compiled, seconds, xla_bytes


def _prepare_jax_mode(
    config: BenchmarkConfig,
    mode: str,
    transformed: hk.Transformed,
    params: hk.Params | None,
    images: jax.Array,
) -> tuple[Callable[[Any], Any], Any, float, int | None]:
    """(call, carry, compile seconds, XLA memory estimate) of one JAX mode."""
    compute_dtype = DTYPES[config.dtype]
    rng = jax.random.PRNGKey(0)
    labels = jnp.arange(config.batch_size, dtype=jnp.int32) % config.num_classes
    if mode == "init":
        init = lambda r, x: transformed.init(r, x, False)
        compiled, seconds, mem = _compile(init, (rng, images))
        return (lambda _: compiled(rng, images)), None, seconds, mem
    if mode == "inference":
        params = _cast(params, compute_dtype)
        apply = lambda p, x: transformed.apply(p, None, x.astype(compute_dtype), is_training=False)[
            "logits"
        ]
        compiled, seconds, mem = _compile(apply, (params, images))
        return (lambda _: compiled(params, images)), None, seconds, mem
    optimizer = optim.make_optimizer(learning_rate=0.1)
    # Fresh copies: donation invalidates the buffers handed in.
    params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)
    donate = (0, 1) if config.donate else ()
    if mode == "optimizer":
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

        def update(p, s, g):
            updates, s = optimizer.update(g, s, p)
            return optax.apply_updates(p, updates), s

        compiled, seconds, mem = _compile(update, (params, opt_state, grads), donate)
        return (lambda c: compiled(c[0], c[1], grads)), (params, opt_state), seconds, mem
    step = make_train_step(transformed, optimizer, compute_dtype, with_update=mode == "train")
    if mode == "grad":
        compiled, seconds, mem = _compile(step, (params, opt_state, images, labels, rng))
        return (lambda _: compiled(params, opt_state, images, labels, rng)), None, seconds, mem
    compiled, seconds, mem = _compile(step, (params, opt_state, images, labels, rng), donate)
    call = lambda c: compiled(c[0], c[1], images, labels, rng)
    return call, (params, opt_state, None), seconds, mem


def prepare_jax(config: BenchmarkConfig, config_index: int = 0) -> list[Prepared]:
    """Compiles every mode of `config` (see the module docstring)."""
    device = jax.devices()[0]
    transformed = hk.transform(make_forward(config))
    rng = jax.random.PRNGKey(0)
    init = jax.jit(transformed.init, static_argnums=2)
    params_by_res: dict[int, hk.Params] = {}
    prepared = []
    for mode in config.modes:
        res = config.resolution(mode)
        images = jax.random.normal(rng, (config.batch_size, res, res, 3), jnp.float32)
        params = None
        if mode != "init":
            if res not in params_by_res:
                params_by_res[res] = init(rng, images, True)
            params = params_by_res[res]
        call, carry, seconds, mem = _prepare_jax_mode(config, mode, transformed, params, images)
        _LOG.info(
            "jax %s (group_conv=%s, conv_grad=%s, remat=%s): compiled in %.1f s",
            mode,
            config.group_conv,
            config.conv_grad,
            config.remat,
            seconds,
        )
        prepared.append(
            Prepared(
                "jax",
                mode,
                config_index,
                config,
                call,
                carry,
                seconds,
                forward_macs(config, res),
                device.device_kind,
                xla_memory_bytes=mem,
            )
        )
    return prepared


def _row(item: Prepared) -> dict[str, Any]:
    config, mode, framework = item.config, item.mode, item.framework
    median = statistics.median(item.times)
    images = config.batch_size
    flops = None
    if mode in ("inference", "train", "grad"):
        flops = 2 * item.macs * images * (1 if mode == "inference" else 3) / median
    peak = peak_flops(item.device_kind, config.dtype)
    return {
        "framework": framework,
        "mode": mode,
        "config": item.config_index,
        "variant": config.variant,
        "batch_size": images,
        "resolution": config.resolution(mode),
        "dtype": config.dtype,
        "group_conv": (layers.resolve_group_conv(config.group_conv) if framework == "jax" else "-"),
        "conv_grad": (layers.resolve_conv_grad(config.conv_grad) if framework == "jax" else "-"),
        "remat": config.remat if framework == "jax" else False,
        "donate": config.donate if framework == "jax" else False,
        "compile_s": item.compile_s,
        "time_s": median,
        "min_time_s": min(item.times),
        "times_s": list(item.times),
        "images_per_s": images / median if mode != "optimizer" else None,
        "macs_per_image": item.macs,
        "flops_per_s": flops,
        "mfu": flops / peak if (flops is not None and peak) else None,
        "peak_memory_bytes": item.memory[0],
        "memory_source": item.memory[1],
        "xla_memory_bytes": item.xla_memory_bytes,
        "device": item.device_kind,
    }


# ------------------------------------------------------------------------------------------
# timm.
# ------------------------------------------------------------------------------------------


def import_timm() -> Any:
    """Imports timm through the project's one torchvision shim (`timm_convert.import_timm`).

    Raises:
      ImportError: if torch or timm is not installed.
    """
    from nfnets_jax.checkpoints import timm_convert  # torch is optional: import lazily.

    return timm_convert.import_timm()


def timm_available() -> tuple[bool, str]:
    """Whether timm can be imported, and why not."""
    try:
        import_timm()
    except Exception as err:  # noqa: BLE001 - any import failure means "not available".
        return False, f"timm is not importable: {type(err).__name__}: {err}"
    return True, ""


def make_timm_model(config: BenchmarkConfig, is_training: bool) -> Any:
    """timm's equivalent of the configured NFNet (`dm_nfnet_f*`, random weights).

    Only "F0".."F7" exist in timm. Width/depth/group-width overrides (`model_kwargs`
    widths, depths, group_width) are applied to timm's config; the stem then keeps timm's
    layout with its width scaled like the first stage's.

    Raises:
      ValueError: if timm has no equivalent of the variant.
    """
    timm = import_timm()
    from timm.models import nfnet as timm_nfnet

    name = f"dm_nfnet_{config.variant.lower()}"
    if name not in timm_nfnet.model_cfgs:
        raise ValueError(f"timm has no {name!r} equivalent of variant {config.variant!r}.")
    mk = config.model_kwargs
    drop = mk.get("drop_rate")
    if drop is None:
        drop = nfnet.VARIANTS[config.variant]["drop_rate"]
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


def prepare_timm(
    config: BenchmarkConfig,
    config_index: int = 0,
    macs: dict[str, int] | None = None,
    channels_last: bool = False,
) -> list[Prepared]:
    """timm's equivalent model for the "inference" and "train" modes of `config`.

    The train step is forward, cross-entropy, backward and an SGD (Nesterov momentum 0.9,
    weight decay 2e-5) step; no AGC. bfloat16 runs under `torch.autocast` (AMP). torch
    uses as many threads as this process has CPU cores.

    Args:
      config: the benchmark configuration.
      config_index: its index in the run.
      macs: per-image forward MACs by mode (the JAX model's count, so FLOP/s compare);
        computed with `forward_macs` when not given.
      channels_last: NHWC memory format for the model and images.
    """
    import torch

    torch.set_num_threads(cpu_cores())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bf16 = config.dtype == "bfloat16"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    prepared = []
    for mode in config.modes:
        if mode not in ("inference", "train"):
            continue
        res = config.resolution(mode)
        torch.manual_seed(0)
        model = make_timm_model(config, is_training=mode == "train").to(device, memory_format=fmt)
        images = torch.randn(config.batch_size, 3, res, res, device=device).to(memory_format=fmt)
        labels = torch.arange(config.batch_size, device=device) % config.num_classes
        if mode == "inference":

            def call(carry, model=model, images=images):
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, torch.bfloat16, enabled=bf16),
                ):
                    out = model(images)
                sync()
                return out
        else:
            sgd = torch.optim.SGD(
                model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5
            )

            def call(carry, model=model, images=images, labels=labels, sgd=sgd):
                sgd.zero_grad(set_to_none=True)
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    logits = model(images)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                loss.backward()
                sgd.step()
                sync()
                return loss.detach()

        start = time.perf_counter()
        call(None)  # Eager: the first call stands in for compilation.
        seconds = time.perf_counter() - start
        _LOG.info("timm %s: first call %.1f s", mode, seconds)
        mode_macs = (macs or {}).get(mode) or forward_macs(config, res)
        if device.type == "cuda":
            memory = (int(torch.cuda.max_memory_allocated()), "torch max_memory_allocated")
        else:
            memory = (process_peak_rss(), "process peak RSS")
        prepared.append(
            Prepared(
                "timm",
                mode,
                config_index,
                config,
                call,
                None,
                seconds,
                mode_macs,
                kind,
                memory=memory,
            )
        )
    return prepared


# ------------------------------------------------------------------------------------------
# Running and reporting.
# ------------------------------------------------------------------------------------------


def run(
    configs: Sequence[BenchmarkConfig], compare_timm: bool = False, timm_channels_last: bool = False
) -> dict[str, Any]:
    """Compiles every configuration (and timm's model once per distinct shape), then times
    all of them round-robin in this process (`time_round_robin`).

    Timing settings (iters, repeats, warmup) are taken from the first configuration.

    Args:
      configs: what to measure.
      compare_timm: also time timm's equivalent and report JAX / timm ratios.
      timm_channels_last: run timm in NHWC memory format.

    Returns:
      {"rows": one per measurement (`times_s` holds every run, `time_s` their median),
       "ratios": [{config, mode, group_conv, remat, donate, jax_s, timm_s, ratio,
       paired_ratio}] where ratio = median jax / median timm and paired_ratio is the median
       over rounds of the per-round ratio, "optimizer_share": [{config, group_conv, remat,
       optimizer_s, train_s, share, and with "grad" measured: grad_s,
       train_minus_grad_share}], "environment": versions and hardware}.

    Raises:
      ValueError: if `configs` is empty.
    """
    if not configs:
        raise ValueError("run() needs at least one BenchmarkConfig.")
    prepared = []
    for index, config in enumerate(configs):
        prepared.extend(prepare_jax(config, index))
    timm_for: dict[int, list[Prepared]] = {}
    if compare_timm:
        done: dict[str, list[Prepared]] = {}
        for index, config in enumerate(configs):
            key = repr(
                (
                    config.variant,
                    config.batch_size,
                    config.inference_resolution,
                    config.train_resolution,
                    config.dtype,
                    config.modes,
                    sorted(config.model_kwargs.items()),
                )
            )
            if key not in done:
                macs = {
                    p.mode: p.macs
                    for p in prepared
                    if p.config_index == index and p.framework == "jax"
                }
                done[key] = prepare_timm(config, index, macs, timm_channels_last)
                prepared.extend(done[key])
            timm_for[index] = done[key]
    first = configs[0]
    time_round_robin(prepared, first.iters, first.repeats, first.warmup)

    rows = [_row(p) for p in prepared]
    jax_items = {(p.config_index, p.mode): p for p in prepared if p.framework == "jax"}
    ratios = []
    for index, timm_items in timm_for.items():
        for t in timm_items:
            j = jax_items.get((index, t.mode))
            if j is None:
                continue
            paired = [a / b for a, b in zip(j.times, t.times)]
            ratios.append(
                {
                    "config": index,
                    "mode": t.mode,
                    "group_conv": layers.resolve_group_conv(j.config.group_conv),
                    "conv_grad": layers.resolve_conv_grad(j.config.conv_grad),
                    "remat": j.config.remat,
                    "donate": j.config.donate,
                    "jax_s": statistics.median(j.times),
                    "timm_s": statistics.median(t.times),
                    "ratio": statistics.median(j.times) / statistics.median(t.times),
                    "paired_ratio": statistics.median(paired),
                    "min_ratio": min(j.times) / min(t.times),
                }
            )
    shares = []
    for index, config in enumerate(configs):
        by_mode = {m: p for (i, m), p in jax_items.items() if i == index}
        if "optimizer" in by_mode and "train" in by_mode:
            opt_s = statistics.median(by_mode["optimizer"].times)
            train_s = statistics.median(by_mode["train"].times)
            share = {
                "config": index,
                "group_conv": layers.resolve_group_conv(config.group_conv),
                "conv_grad": layers.resolve_conv_grad(config.conv_grad),
                "remat": config.remat,
                "optimizer_s": opt_s,
                "train_s": train_s,
                "share": opt_s / train_s,
            }
            if "grad" in by_mode:
                grad_s = statistics.median(by_mode["grad"].times)
                share["grad_s"] = grad_s
                share["train_minus_grad_share"] = 1 - grad_s / train_s
            shares.append(share)
    return {"rows": rows, "ratios": ratios, "optimizer_share": shares, "environment": environment()}


def environment() -> dict[str, Any]:
    """Versions and hardware, for the record."""
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax_devices": jax.device_count(),
        "cpu_cores": cpu_cores(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["timm"] = import_timm().__version__
    except Exception:  # noqa: BLE001 - torch/timm are optional.
        pass
    return env


def _fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value / scale:.{digits}g}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of `run`'s result (times are medians; all repeats in the JSON)."""
    header = [
        "framework",
        "mode",
        "variant",
        "batch",
        "px",
        "dtype",
        "group_conv",
        "conv_grad",
        "remat",
        "donate",
        "compile s",
        "time s",
        "min s",
        "img/s",
        "GFLOP/s",
        "MFU",
        "peak mem MiB",
        "XLA mem MiB",
    ]
    lines = []
    for r in result["rows"]:
        lines.append(
            [
                r["framework"],
                r["mode"],
                r["variant"],
                str(r["batch_size"]),
                str(r["resolution"]),
                r["dtype"],
                r["group_conv"],
                r["conv_grad"],
                _fmt(r["remat"]),
                _fmt(r["donate"]),
                _fmt(r["compile_s"]),
                _fmt(r["time_s"], digits=4),
                _fmt(r["min_time_s"], digits=4),
                _fmt(r["images_per_s"]),
                _fmt(r["flops_per_s"], 1e9),
                _fmt(r["mfu"]),
                f"{r['peak_memory_bytes'] / 2**20:.0f}",
                _fmt(r["xla_memory_bytes"] and r["xla_memory_bytes"] / 2**20, digits=4),
            ]
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    out = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths)),
        "-+-".join("-" * w for w in widths),
    ]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    for ratio in result["ratios"]:
        out.append(
            f"ratio jax/timm {ratio['mode']} (group_conv={ratio['group_conv']}, "
            f"conv_grad={ratio['conv_grad']}, "
            f"remat={_fmt(ratio['remat'])}, donate={_fmt(ratio['donate'])}): "
            f"{ratio['ratio']:.3f} ({ratio['jax_s']:.4g} s / {ratio['timm_s']:.4g} s); "
            f"median per-round ratio {ratio['paired_ratio']:.3f}; ratio of minima "
            f"{ratio['min_ratio']:.3f}"
        )
    for share in result["optimizer_share"]:
        line = (
            f"optimizer (AGC + weight decay + SGD) alone / train step "
            f"(group_conv={share['group_conv']}, conv_grad={share['conv_grad']}, "
            f"remat={_fmt(share['remat'])}): "
            f"{100 * share['share']:.2f}%"
        )
        if "train_minus_grad_share" in share:
            line += f"; 1 - grad/train: {100 * share['train_minus_grad_share']:.2f}%"
        out.append(line)
    if result["rows"]:
        rounds = len(result["rows"][0]["times_s"])
        out.append(
            f"times: median of {rounds} round-robin rounds (all in the JSON); peak "
            f"mem: {result['rows'][0]['memory_source']}; XLA mem: the compiled "
            "executable's arguments + outputs + temporaries"
        )
    return "\n".join(out)


def write_json(result: dict[str, Any], path: str) -> None:
    """Writes `run`'s result as JSON (atomically: a temporary file renamed into place)."""
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=lambda o: float(np.asarray(o)))
    os.replace(tmp, path)


def build_configs(
    group_convs: Sequence[str] = ("auto",),
    remats: Sequence[bool] = (False,),
    donates: Sequence[bool] = (True,),
    conv_grads: Sequence[str] = ("auto",),
    **common: Any,
) -> list[BenchmarkConfig]:
    """One `BenchmarkConfig` per (group_conv, conv_grad, remat, donate), sharing `common`."""
    return [
        BenchmarkConfig(group_conv=g, conv_grad=c, remat=r, donate=d, **common)
        for g in group_convs
        for c in conv_grads
        for r in remats
        for d in donates
    ]
