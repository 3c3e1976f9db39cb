"""Step benchmark: NFNet inference and the trainer's own training step, side by side with timm.

Every measurement is compiled first (compile time is reported separately) and then timed
with `timing.round_robin` (median over rounds, all rounds in the JSON). A row also reports
images/s, peak memory (the device's `peak_bytes_in_use` where the backend keeps memory
statistics, else the process's peak RSS, which never decreases during a run), XLA's memory
estimate of the compiled executable, achieved FLOP/s (2 x the MACs of
`counting.model_counts`; a training step counts 3x the forward MACs) and, where the
device's peak is in `timing.PEAK_FLOPS`, model-FLOP utilisation.

Modes, all on one device (the first), with the code the trainer and evaluation run:
- "init": the jitted parameter initialisation.
- "inference": the trainer's evaluation forward pass (`steps.eval_logits_fn`, in the
  configured precision).
- "train": `steps.train_step` under `parallel.pmap`, exactly as the trainer runs it:
  forward and backward of the label-smoothed (0.1) cross-entropy on one-hot targets, the
  cross-device mean, AGC -> weight decay -> Nesterov SGD (`optim.make_optimizer`), the EMA
  update and the step's metrics, with the training state donated.
- "grad": forward and backward only (`steps.gradients`), to locate the optimizer's share.
- "optimizer": AGC + weight decay + SGD update alone on gradients of the parameters' shape.

With `compare_timm`, timm's `dm_nfnet_f*` is timed in the same rounds (`timm_model`) and the
ratio JAX time / timm time is reported per mode.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax import optim, parallel
from nfnets_jax.bench import step_report, timing
from nfnets_jax.models import counting, layers, registry
from nfnets_jax.train import recipe, steps

MODES = ("init", "inference", "train", "grad", "optimizer")
DTYPES = ("float32", "bfloat16")
LABEL_SMOOTHING = 0.1  # The recipe's (configs/default.py).
MAX_EMA_DECAY = 0.99999
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
      remat: rematerialise each residual block in the backward pass
        (`registry.build_forward(remat=True)`).
      donate: donate the training state (parameters, EMA, optimizer state) to the step.
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
        registry.variant("NFNet", self.variant)
        for name in ("batch_size", "inference_resolution", "train_resolution", "iters", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def resolution(self, mode: str) -> int:
        """Image size used by `mode`."""
        if mode in ("init", "inference"):
            return self.inference_resolution
        return self.train_resolution

    def model_args(self) -> dict[str, Any]:
        """`registry.build_forward` / `forward_fn` arguments of the configured network."""
        return dict(
            model_name="NFNet",
            remat=self.remat,
            num_classes=self.num_classes,
            variant=self.variant,
            group_conv=self.group_conv,
            conv_grad=self.conv_grad,
            **self.model_kwargs,
        )

    def model(self) -> Any:
        """The configured network (`registry.build_forward`)."""
        return registry.build_forward(**self.model_args())


@dataclasses.dataclass
class Prepared:
    """A compiled measurement and what its row reports.

    Attributes:
      timed: the call to time and its timings.
      framework: "jax" or "timm".
      mode: one of `MODES`.
      config_index: which configuration of the run it belongs to.
      config: that configuration.
      compile_s: compilation time (timm: the first, eager call).
      macs: per-image forward MACs.
      device_kind: the device it runs on.
      memory: (bytes, source) peak memory after compilation and warm-up.
      xla_memory_bytes: XLA's estimate for the compiled executable, JAX only.
    """

    timed: timing.Timed
    framework: str
    mode: str
    config_index: int
    config: BenchmarkConfig
    compile_s: float
    macs: int
    device_kind: str
    memory: tuple[int, str] = (0, "")
    xla_memory_bytes: int | None = None


def forward_macs(config: BenchmarkConfig, resolution: int) -> int:
    """Per-image forward MACs of the configured model (`counting.model_counts`)."""
    return counting.model_counts(config.model(), resolution)["macs"]


def train_pieces(config: BenchmarkConfig, model: Any, device: jax.Device) -> dict[str, Any]:
    """The trainer's state, one-device batch, step and loss for `config` (see `jax_program`)."""
    res = config.train_resolution
    policy = recipe.precision_policy(config.dtype)
    optimizer = optim.make_optimizer(optim.warmup_cosine_schedule(1.6, 10, 1000))
    state = steps.create_train_state(model, optimizer, res, seed=0)
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    batch = {
        "images": rng.standard_normal((1, config.batch_size, res, res, 3)).astype(dtype),
        "labels": np.eye(config.num_classes, dtype=np.float32)[
            None, np.arange(config.batch_size) % config.num_classes
        ],
    }
    step = functools.partial(
        steps.train_step,
        model=model,
        optimizer=optimizer,
        schedule=lambda _: 0.1,
        policy=policy,
        label_smoothing=LABEL_SMOOTHING,
        max_ema_decay=MAX_EMA_DECAY,
        use_sam=False,
    )
    loss = functools.partial(
        steps.loss_fn, model=model, policy=policy, label_smoothing=LABEL_SMOOTHING
    )
    return dict(
        policy=policy,
        optimizer=optimizer,
        step=step,
        loss=loss,
        state=parallel.replicate(state, [device]),
        batch=parallel.shard(batch, [device]),
        stop=parallel.shard(np.zeros((1,), np.int32), [device]),
    )


def jax_program(
    config: BenchmarkConfig,
    mode: str,
    model: Any,
    device: jax.Device,
    pieces: dict[str, Any] | None = None,
) -> tuple[Callable[..., Any], tuple[Any, ...], tuple[int, ...], int]:
    """What one JAX mode runs: (function, its arguments, donated argnums, carried count).

    The first `carried` outputs of the function are its first `carried` arguments at the
    next call (the training state, or parameters and optimizer state), so donated buffers
    flow from call to call. `train` and `grad` are `parallel.pmap`-ed over `device`.
    `pieces` (from `train_pieces`) may be shared by the modes of one configuration: the
    modes that donate their inputs get copies.
    """
    res = config.resolution(mode)
    images = jax.device_put(
        jax.random.normal(jax.random.PRNGKey(0), (config.batch_size, res, res, 3)), device
    )
    if mode == "init":
        return model.init, (jax.random.PRNGKey(0), images), (), 0
    p = pieces or train_pieces(config, model, device)
    params = jax.tree.map(lambda x: x[0], p["state"].params)
    if mode == "inference":
        return steps.eval_logits_fn(model, p["policy"]), (params, images), (), 0
    donate = config.donate
    if mode == "optimizer":
        optimizer = p["optimizer"]
        grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

        def update(w, s, g):
            updates, s = optimizer.update(g, s, w)
            return optax.apply_updates(w, updates), s

        if donate:
            params = jax.tree.map(jnp.copy, params)
        return update, (params, optimizer.init(params), grads), (0, 1) if donate else (), 2
    state, batch, stop = p["state"], p["batch"], p["stop"]
    if mode == "grad":
        grad = parallel.pmap(lambda s, b: steps.gradients(s, b, p["loss"])[1], devices=[device])
        return grad, (state, batch), (), 0
    train = parallel.pmap(p["step"], donate_argnums=(0,) if donate else (), devices=[device])
    if donate:
        state = jax.tree.map(jnp.copy, state)
    return train, (state, batch, stop), (), 1


def _timed(
    config: BenchmarkConfig, mode: str, model: Any, device: jax.Device, pieces: Any
) -> tuple[timing.Timed, float, int | None]:
    """The timed call, compile seconds and XLA memory estimate of one JAX mode."""
    fn, args, donate, carried = jax_program(config, mode, model, device, pieces)
    compiled, seconds, mem = timing.compile_with_memory(fn, args, donate)
    rest = args[carried:]
    if carried:
        call = lambda carry: tuple(compiled(*carry, *rest)[:carried])
    else:
        call = lambda _: compiled(*args)
    return timing.Timed(f"jax {mode}", call, tuple(args[:carried])), seconds, mem


def prepare_jax(config: BenchmarkConfig, config_index: int = 0) -> list[Prepared]:
    """Compiles every mode of `config` (see the module docstring)."""
    device = jax.devices()[0]
    model = config.model()
    # One training state, batch and step for all modes (the init compiles once).
    pieces = train_pieces(config, model, device) if set(config.modes) - {"init"} else None
    prepared = []
    for mode in config.modes:
        timed, seconds, mem = _timed(config, mode, model, device, pieces)
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
                timed,
                "jax",
                mode,
                config_index,
                config,
                seconds,
                forward_macs(config, config.resolution(mode)),
                device.device_kind,
                xla_memory_bytes=mem,
            )
        )
    return prepared


def run(
    configs: Sequence[BenchmarkConfig], compare_timm: bool = False, timm_channels_last: bool = False
) -> dict[str, Any]:
    """Compiles every configuration (and timm's model once per distinct shape), then times
    all of them round-robin in this process (`timing.round_robin`).

    Timing settings (iters, repeats, warmup) are taken from the first configuration.

    Returns:
      {"rows": one per measurement (`times_s` holds every run, `time_s` their median),
       "ratios": [{config, mode, ..., jax_s, timm_s, ratio, paired_ratio, min_ratio}],
       "optimizer_share": [{config, ..., optimizer_s, train_s, share, and with "grad"
       measured: grad_s, train_minus_grad_share}], "environment": versions and hardware}.

    Raises:
      ValueError: if `configs` is empty.
    """
    if not configs:
        raise ValueError("run() needs at least one BenchmarkConfig.")
    jax_items = [p for index, config in enumerate(configs) for p in prepare_jax(config, index)]
    timm_items: list[Prepared] = []
    timm_for: dict[int, list[Prepared]] = {}
    if compare_timm:
        from nfnets_jax.bench import timm_model  # torch is optional.

        done: dict[str, list[Prepared]] = {}  # One timm measurement per distinct shape.
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
                macs = {p.mode: p.macs for p in jax_items if p.config_index == index}
                done[key] = timm_model.prepare(config, index, macs, timm_channels_last)
                timm_items.extend(done[key])
            timm_for[index] = done[key]
    by_timed = {id(p.timed): p for p in jax_items}

    def read_memory(timed: timing.Timed) -> None:
        if id(timed) in by_timed:
            by_timed[id(timed)].memory = timing.jax_peak_memory()

    first, items = configs[0], jax_items + timm_items
    timing.round_robin(
        [p.timed for p in items], first.repeats, first.warmup, first.iters, on_warm=read_memory
    )
    return {
        "rows": [step_report.row(p) for p in items],
        "ratios": step_report.ratios(jax_items, timm_for),
        "optimizer_share": step_report.optimizer_shares(jax_items),
        "environment": timing.environment(),
    }


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
