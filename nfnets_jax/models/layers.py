"""Normalizer-free building blocks: scaled WS conv, squeeze-excite, stochastic depth, pooling.

Grouped convolutions can run three numerically identical ways (`GROUP_CONV_STRATEGIES`):
- "native": one `lax.conv_general_dilated` with `feature_group_count`;
- "split": one dense convolution per group, concatenated;
- "dense": the grouped kernel expanded into a block-diagonal dense kernel, one convolution
  (groups x the FLOPs, but the fastest kernels on some backends).
The parameters are the same for every strategy (kernel HWIO with I = in_channels / groups).
"auto" picks the measured-fastest for the current backend (see `default_group_conv`).

Independently, the backward pass of every WS convolution can be computed two ways
(`CONV_GRAD_IMPLS`), with identical forward values: "xla" (autodiff of the ops above) or
"matmul" (`conv_grad`: 1x1 convolution gradients as matrix products and a closed-form
weight-standardisation backward pass, the fast path on XLA:CPU). "auto" resolves per
backend (`default_conv_grad`).
"""

import contextlib
from collections.abc import Iterator

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import conv_grad


class _BackendChoice:
    """A named implementation choice: valid names, a per-backend "auto", a forcing context."""

    def __init__(
        self, what: str, options: tuple[str, ...], defaults: dict[str, str], fallback: str
    ):
        self.what, self.options = what, options
        self.defaults, self.fallback = defaults, fallback
        self.forced_stack: list[str] = []

    def default(self, backend: str | None = None) -> str:
        return self.defaults.get(backend or jax.default_backend(), self.fallback)

    def resolve(self, name: str) -> str:
        if name != "auto" and name not in self.options:
            raise ValueError(
                f"Unknown {self.what} {name!r}; valid: 'auto', "
                + ", ".join(repr(s) for s in self.options)
                + "."
            )
        if self.forced_stack:
            return self.forced_stack[-1]
        return self.default() if name == "auto" else name

    @contextlib.contextmanager
    def forced(self, name: str) -> Iterator[None]:
        self.forced_stack.append(self.resolve(name))
        try:
            yield
        finally:
            self.forced_stack.pop()


GROUP_CONV_STRATEGIES = ("native", "split", "dense")
CONV_GRAD_IMPLS = ("xla", "matmul")
# Fastest choice per backend, measured with scripts/benchmark.py (docs/performance.md).
# GPU/TPU keep native grouped convolutions and XLA's gradients (not measured here: no
# accelerator was available).
_GROUP_CONV = _BackendChoice(
    "group_conv strategy", GROUP_CONV_STRATEGIES, {"cpu": "split"}, "native"
)
_CONV_GRAD = _BackendChoice("conv_grad implementation", CONV_GRAD_IMPLS, {"cpu": "matmul"}, "xla")


def default_group_conv(backend: str | None = None) -> str:
    """The grouped-conv strategy "auto" resolves to on `backend` (default: jax's)."""
    return _GROUP_CONV.default(backend)


def resolve_group_conv(strategy: str) -> str:
    """Validates a strategy name and resolves "auto" (and any forced override)."""
    return _GROUP_CONV.resolve(strategy)


def forced_group_conv(strategy: str) -> contextlib.AbstractContextManager[None]:
    """Within the context, every grouped convolution traced uses `strategy`."""
    return _GROUP_CONV.forced(strategy)


def default_conv_grad(backend: str | None = None) -> str:
    """The convolution-gradient implementation "auto" resolves to on `backend`."""
    return _CONV_GRAD.default(backend)


def resolve_conv_grad(impl: str) -> str:
    """Validates an implementation name and resolves "auto" (and any forced override)."""
    return _CONV_GRAD.resolve(impl)


def forced_conv_grad(impl: str) -> contextlib.AbstractContextManager[None]:
    """Within the context, every WS convolution traced uses the `impl` backward pass."""
    return _CONV_GRAD.forced(impl)


def standardize_weight(
    w: jax.Array, gain: jax.Array, eps: float = 1e-4, eps_mode: str = "max"
) -> jax.Array:
    """Scaled weight standardisation of an HWIO kernel, per output unit.

    Reference ("max"): (w - mean) * gain / sqrt(max(fan_in * var, eps)), fan_in = H*W*I.
    timm ("add"):      (w - mean) * gain / sqrt(fan_in * (var + eps)).
    """
    mean, _, rsqrt = conv_grad.ws_statistics(w, eps, eps_mode)
    scale = rsqrt * gain
    return w * scale - mean * scale


def grouped_conv(
    x: jax.Array,
    w: jax.Array,
    stride: int,
    groups: int,
    strategy: str = "native",
    grad: str = "xla",
) -> jax.Array:
    """NHWC x HWIO convolution with TF-style SAME padding and `groups` feature groups.

    `grad="matmul"` routes every ungrouped convolution (all of them under "split" and
    "dense") through `conv_grad.conv2d_same` (matrix-product gradients for 1x1 kernels).
    """
    strategy = resolve_group_conv(strategy)
    matmul_grad = resolve_conv_grad(grad) == "matmul"

    def conv(lhs, rhs, g=1):
        if g == 1 and matmul_grad:
            return conv_grad.conv2d_same(lhs, rhs, stride)
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides=(stride, stride),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=g,
        )

    if groups == 1 or strategy == "native":
        return conv(x, w, groups)
    if strategy == "split":
        xs = jnp.split(x, groups, axis=-1)
        ws = jnp.split(w, groups, axis=-1)
        return jnp.concatenate([conv(a, b) for a, b in zip(xs, ws)], axis=-1)
    # "dense": block-diagonal expansion of the grouped kernel.
    kh, kw, cin_g, cout = w.shape
    cout_g = cout // groups
    blocks = w.reshape(kh, kw, cin_g, groups, cout_g)
    eye = jnp.eye(groups, dtype=w.dtype)
    dense = jnp.einsum("hwigo,gk->hwgiko", blocks, eye).reshape(kh, kw, cin_g * groups, cout)
    return conv(x, dense)


class WSConv2D(hk.Module):
    """2-D convolution with scaled weight standardisation, a learned gain and a bias.

    Parameters: `w` (HWIO, VarianceScaling(1, fan_in, normal)), `gain` (O,) = 1,
    `bias` (O,) = 0. Padding is TF-style SAME. `group_conv` picks the grouped-convolution
    strategy and `conv_grad` the backward-pass implementation (module docstring).
    """

    def __init__(
        self,
        output_channels: int,
        kernel_shape: int = 1,
        stride: int = 1,
        feature_group_count: int = 1,
        with_bias: bool = True,
        eps: float = 1e-4,
        eps_mode: str = "max",
        group_conv: str = "auto",
        conv_grad: str = "auto",
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.output_channels = output_channels
        self.kernel_shape = kernel_shape
        self.stride = stride
        self.groups = feature_group_count
        self.with_bias = with_bias
        self.eps = eps
        self.eps_mode = eps_mode
        self.group_conv = group_conv
        self.conv_grad = conv_grad
        resolve_conv_grad(conv_grad)
        if output_channels % feature_group_count:
            raise ValueError(
                f"output_channels={output_channels} is not divisible by "
                f"feature_group_count={feature_group_count}."
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        in_ch = x.shape[-1]
        if in_ch % self.groups:
            raise ValueError(
                f"{self.module_name}: {in_ch} input channels are not divisible "
                f"by {self.groups} groups."
            )
        k = self.kernel_shape
        w_shape = (k, k, in_ch // self.groups, self.output_channels)
        w_init = hk.initializers.VarianceScaling(1.0, "fan_in", "normal")
        w = hk.get_parameter("w", w_shape, x.dtype, init=w_init)
        gain = hk.get_parameter("gain", (self.output_channels,), w.dtype, init=jnp.ones)
        grad = resolve_conv_grad(self.conv_grad)
        ws = conv_grad.standardize_weight if grad == "matmul" else standardize_weight
        w_hat = ws(w, gain, self.eps, self.eps_mode)
        out = grouped_conv(x, w_hat, self.stride, self.groups, self.group_conv, grad)
        if self.with_bias:
            out = out + hk.get_parameter("bias", (self.output_channels,), out.dtype, init=jnp.zeros)
        return out


class SqueezeExcite(hk.Module):
    """Squeeze-excite gate: mean over H, W -> Linear -> ReLU -> Linear -> sigmoid.

    Returns the gate, shape (N, 1, 1, C), for the caller to multiply with (NFNets use
    `2 * gate * x`). Submodules are `linear` and `linear_1`, as in the release.
    """

    def __init__(
        self, in_ch: int, out_ch: int, se_ratio: float = 0.5, name: str | None = "squeeze_excite"
    ):
        super().__init__(name=name)
        self.hidden_ch = max(1, int(in_ch * se_ratio))
        self.fc0 = hk.Linear(self.hidden_ch, with_bias=True)
        self.fc1 = hk.Linear(out_ch, with_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.mean(x, axis=(1, 2))
        h = self.fc1(jax.nn.relu(self.fc0(h)))
        return jax.nn.sigmoid(h)[:, None, None, :]


def stochastic_depth(
    x: jax.Array, rate: float, is_training: bool, rng: jax.Array | None = None
) -> jax.Array:
    """Drops the whole residual branch of each example with probability `rate`.

    No 1/keep rescaling (as the reference); the identity at evaluation or when rate == 0.
    Uses `hk.next_rng_key()` unless `rng` is given.
    """
    if not is_training or rate <= 0.0:
        return x
    if not 0.0 < rate < 1.0:
        raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}.")
    rng = hk.next_rng_key() if rng is None else rng
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * keep.astype(x.dtype)


def avg_pool_same(x: jax.Array, window: int = 2, stride: int = 2) -> jax.Array:
    """NHWC average pool, TF-style SAME padding, dividing by the count of unpadded inputs."""
    return hk.avg_pool(
        x, window_shape=(1, window, window, 1), strides=(1, stride, stride, 1), padding="SAME"
    )
