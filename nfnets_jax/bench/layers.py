"""Per-layer convolution benchmark: every distinct convolution of an NFNet, forward +
backward, under each `conv_grad` implementation and, optionally, PyTorch.

It answers the question the whole-step benchmark (`bench.step`) cannot: are the
convolutions themselves slower than PyTorch's, or is it the rest of the training step?
`conv_layers` lists the model's weight-standardised convolutions (input size, channels,
groups, kernel, stride) with how often each occurs; `run` times, for each of them, the
gradients with respect to the input and the weight of sum(conv(x, w) * r) (no input
gradient for the stem's first convolution, as in training), round-robin over the
implementations so that the compared numbers share the machine's load, and sums
count x median per implementation. Weight standardisation is not included: only the
convolution, through `layers.grouped_conv` (same grouped-convolution strategy and
`conv_grad` routing as the model). torch runs `torch.nn.functional.conv2d` in NCHW (oneDNN
on CPU) with the same SAME padding.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.bench import step, timing
from nfnets_jax.models import conv_grad, layers, registry


@dataclasses.dataclass(frozen=True, order=True)
class ConvLayer:
    """One convolution shape: square input `size`, NHWC / HWIO, SAME padding.

    `takes_images`: the model's first convolution, applied to the images, whose input
    gradient training never computes.
    """

    size: int
    in_ch: int
    out_ch: int
    groups: int
    kernel: int
    stride: int
    takes_images: bool = False

    @property
    def out_size(self) -> int:
        return -(-self.size // self.stride)

    def macs(self, batch: int) -> int:
        """Forward multiply-accumulates for `batch` images."""
        return batch * self.out_size**2 * self.out_ch * self.kernel**2 * self.in_ch // self.groups

    def label(self) -> str:
        return (
            f"{self.size}px {self.in_ch}->{self.out_ch} g{self.groups} "
            f"k{self.kernel} s{self.stride}" + (" (images)" if self.takes_images else "")
        )


def conv_layers(config: step.BenchmarkConfig) -> collections.Counter:
    """{ConvLayer: number of calls} of the configured NFNet's training forward pass at
    `config.train_resolution` (shapes only: traced with `jax.eval_shape`)."""
    forward = registry.forward_fn(**config.model_args())
    found: collections.Counter = collections.Counter()

    def record(next_f, args, kwargs, context):
        module = context.module
        if isinstance(module, layers.WSConv2D) and context.method_name == "__call__":
            x = args[0]
            found[
                ConvLayer(
                    x.shape[1],
                    x.shape[-1],
                    module.output_channels,
                    module.groups,
                    module.kernel_shape,
                    module.stride,
                    takes_images=not found,
                )
            ] += 1
        return next_f(*args, **kwargs)

    def traced(images):
        with hk.intercept_methods(record):
            return forward(images, True)

    res = config.train_resolution
    images = jax.ShapeDtypeStruct((config.batch_size, res, res, 3), jnp.float32)
    jax.eval_shape(hk.transform(traced).init, jax.random.PRNGKey(0), images)
    return found


def _arrays(layer: ConvLayer, batch: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    fan_in = layer.kernel**2 * layer.in_ch // layer.groups
    x = rng.standard_normal((batch, layer.size, layer.size, layer.in_ch), np.float32)
    w = rng.standard_normal(
        (layer.kernel, layer.kernel, layer.in_ch // layer.groups, layer.out_ch), np.float32
    ) / np.float32(np.sqrt(fan_in))
    r = rng.standard_normal((batch, layer.out_size, layer.out_size, layer.out_ch), np.float32)
    return x, w, r


def jax_call(
    layer: ConvLayer,
    x: np.ndarray,
    w: np.ndarray,
    r: np.ndarray,
    group_conv: str,
    impl: str,
    input_grad: bool,
) -> Callable[[], Any]:
    """A compiled forward + backward of one convolution, ready to time."""

    def loss(a, b, c):
        return jnp.sum(layers.grouped_conv(a, b, layer.stride, layer.groups, group_conv, impl) * c)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1) if input_grad else 1))
    args = [jnp.asarray(v) for v in (x, w, r)]
    return lambda: jax.block_until_ready(grad(*args))


def torch_call(
    layer: ConvLayer, x: np.ndarray, w: np.ndarray, r: np.ndarray, input_grad: bool
) -> Callable[[], Any]:
    """The same forward + backward in PyTorch (NCHW, explicit SAME padding)."""
    import torch  # Optional dependency: only for the comparison.

    functional = torch.nn.functional
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(input_grad)
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
    tr = torch.from_numpy(r.transpose(0, 3, 1, 2).copy())
    (top, bottom), (left, right) = [
        conv_grad.same_padding(layer.size, layer.kernel, layer.stride)
    ] * 2
    symmetric = top == bottom

    def call():
        tx.grad = tw.grad = None
        inp = tx if symmetric else functional.pad(tx, (left, right, top, bottom))
        out = functional.conv2d(
            inp, tw, stride=layer.stride, padding=top if symmetric else 0, groups=layer.groups
        )
        (out * tr).sum().backward()
        return tw.grad

    return call


def run(
    config: step.BenchmarkConfig,
    impls: Sequence[str] = ("xla", "matmul"),
    compare_torch: bool = False,
    repeats: int = 5,
    warmup: int = 1,
    iters: int = 5,
) -> dict[str, Any]:
    """Times every distinct convolution of the configured model (module docstring).

    Each timed run is `iters` back-to-back calls (their mean is recorded). Single calls
    are not enough at these sizes: the call that follows a switch of framework pays for
    the other's threads (PyTorch's OpenMP threads spin for a while after a parallel region:
    the first JAX call of a round was up to 30% slower per layer), and sleeping between
    calls instead penalises whichever framework must wake its threads. The order rotates
    from round to round (`timing.round_robin`), so no implementation always runs right
    after torch.

    Returns:
      {"layers": [{"layer", "count", "gmacs" (per call), "times_ms": {impl: [per round]},
       "median_ms": {impl: median}}], "total_ms": {impl: sum of count x median},
       "implementations": list, "config": the `BenchmarkConfig` as a dict}.
    """
    if repeats < 1 or iters < 1:  # Before any compilation.
        raise ValueError(f"repeats and iters must be >= 1, got {repeats} and {iters}.")
    for impl in impls:
        layers.resolve_conv_grad(impl)  # A clear error for an unknown name, before timing.
    names = [f"jax {impl}" for impl in impls] + (["torch"] if compare_torch else [])
    if compare_torch:
        import torch

        torch.set_num_threads(timing.cpu_cores())
    rows = []
    for index, (layer, count) in enumerate(sorted(conv_layers(config).items())):
        x, w, r = _arrays(layer, config.batch_size, index)
        input_grad = not layer.takes_images
        calls = {
            f"jax {impl}": jax_call(layer, x, w, r, config.group_conv, impl, input_grad)
            for impl in impls
        }
        if compare_torch:
            calls["torch"] = torch_call(layer, x, w, r, input_grad)
        timed = [timing.Timed(name, lambda _, call=call: call()) for name, call in calls.items()]
        # The first call compiles; rotating rounds keep torch's spinning threads fair.
        timing.round_robin(timed, repeats, warmup + 1, iters)
        times = {t.name: [1e3 * seconds for seconds in t.times] for t in timed}
        rows.append(
            {
                "layer": dataclasses.asdict(layer),
                "label": layer.label(),
                "count": count,
                "gmacs": layer.macs(config.batch_size) / 1e9,
                "times_ms": times,
                "median_ms": {n: float(np.median(t)) for n, t in times.items()},
            }
        )
    total = {n: float(sum(row["count"] * row["median_ms"][n] for row in rows)) for n in names}
    return {
        "layers": rows,
        "total_ms": total,
        "implementations": names,
        "config": dataclasses.asdict(config),
    }


def format_table(result: dict[str, Any]) -> str:
    """Per-layer milliseconds (median over rounds) and count-weighted totals."""
    names = result["implementations"]
    head = f"{'layer':32s} | {'calls':>5s} | {'GMAC':>6s} | " + " | ".join(
        f"{n + ' ms':>12s}" for n in names
    )
    lines = [head, "-" * len(head)]
    for row in result["layers"]:
        lines.append(
            f"{row['label']:32s} | {row['count']:5d} | {row['gmacs']:6.3f} | "
            + " | ".join(f"{row['median_ms'][n]:12.2f}" for n in names)
        )
    lines.append("-" * len(head))
    total = result["total_ms"]
    lines.append(
        f"{'total (calls x median)':32s} | {'':5s} | {'':6s} | "
        + " | ".join(f"{total[n]:12.1f}" for n in names)
    )
    if "torch" in total:
        for n in names[:-1]:
            lines.append(f"ratio {n} / torch: {total[n] / total['torch']:.3f}")
    return "\n".join(lines)
