"""NFNet-F0..F7 and F0+..F7+ (Brock et al. 2021), parameter-compatible with the release.

Module paths and parameter names reproduce DeepMind's released checkpoints exactly
(REFERENCE §6), so a released parameter file drops in with no renaming.
"""

from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import activations, layers, variants

STRIDES = (1, 2, 2, 2)
NUMERICS = {
    # name: (gelu variant, WS epsilon, WS epsilon mode)
    "reference": ("gelu", 1e-4, "max"),
    "timm": ("gelu_exact", 1e-5, "add"),
}


def check_images(x: jax.Array, in_channels: int, model: str) -> None:
    """Clear errors for the usual input mistakes (shape, channels, integer images)."""
    if x.ndim != 4:
        raise ValueError(f"{model} expects NHWC images of rank 4, got shape {tuple(x.shape)}.")
    if x.shape[-1] != in_channels:
        raise ValueError(
            f"{model} expects {in_channels} input channels (NHWC, channels last), "
            f"got {x.shape[-1]} in shape {tuple(x.shape)}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{model} expects floating-point images (normalised, e.g. float32 or "
            f"bfloat16), got dtype {x.dtype}; convert and normalise them first."
        )


def expected_stds(depths: Sequence[int], alpha: float) -> list[float]:
    """Expected std of the residual stream entering each block (beta = 1 / this)."""
    stds, expected = [], 1.0
    for depth in depths:
        for block_index in range(depth):
            stds.append(expected)
            if block_index == 0:
                expected = 1.0
            expected = (expected**2 + alpha**2) ** 0.5
    return stds


def _bottleneck_width(out_ch: int, expansion: float, group_size: int) -> tuple[int, int]:
    """Bottleneck width floored to a multiple of `group_size`, and its group count."""
    width = int(out_ch * expansion)
    groups = width // group_size
    if groups == 0:
        raise ValueError(
            f"Bottleneck width {width} (out_ch={out_ch} * {expansion}) is smaller "
            f"than group_width={group_size}; lower group_width."
        )
    return group_size * groups, groups


class NFBlock(hk.Module):
    """Pre-activation normalizer-free bottleneck block with grouped 3x3 convs and SE."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        expansion: float = 0.5,
        se_ratio: float = 0.5,
        group_size: int = 128,
        stride: int = 1,
        beta: float = 1.0,
        alpha: float = 0.2,
        activation: str = "gelu",
        conv_kwargs: dict[str, Any] | None = None,
        use_two_convs: bool = True,
        stochdepth_rate: float = 0.0,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.beta, self.alpha = beta, alpha
        self.activation = activations.get(activation)
        self.stochdepth_rate = stochdepth_rate
        self.width, self.groups = _bottleneck_width(out_ch, expansion, group_size)
        conv = lambda ch, k=1, **kw: layers.WSConv2D(ch, k, **(conv_kwargs or {}), **kw)
        self.conv0 = conv(self.width, 1, name="conv0")
        self.conv1 = conv(
            self.width, 3, stride=stride, feature_group_count=self.groups, name="conv1"
        )
        self.conv1b = (
            conv(self.width, 3, feature_group_count=self.groups, name="conv1b")
            if use_two_convs
            else None
        )
        self.conv2 = conv(out_ch, 1, name="conv2")
        self.use_projection = stride > 1 or in_ch != out_ch
        self.conv_shortcut = conv(out_ch, 1, name="conv_shortcut") if self.use_projection else None
        self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio) if se_ratio else None

    def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
        act = self.activation
        out = act(x) * self.beta
        if self.stride > 1:
            shortcut = self.conv_shortcut(layers.avg_pool_same(out))
        elif self.use_projection:
            shortcut = self.conv_shortcut(out)
        else:
            shortcut = x
        out = self.conv0(out)
        out = self.conv1(act(out))
        if self.conv1b is not None:
            out = self.conv1b(act(out))
        out = self.conv2(act(out))
        if self.se is not None:
            out = (2 * self.se(out)) * out
        # Residual-branch variance at this point, for signal-propagation plots.
        res_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
        out = layers.stochastic_depth(out, self.stochdepth_rate, is_training)
        out = out * hk.get_parameter("skip_gain", (), out.dtype, init=jnp.zeros)
        return out * self.alpha + shortcut, res_var


def channel_stats(x: jax.Array) -> dict[str, jax.Array]:
    """Average channel squared mean and average channel variance of an NHWC tensor."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    return {"avg_sq_mean": jnp.mean(mean**2), "avg_var": jnp.mean(jnp.var(x, axis=(0, 1, 2)))}


def run_body(
    stem_out: jax.Array,
    blocks: Sequence[hk.Module],
    stage_ends: Sequence[int],
    is_training: bool,
    return_features: bool,
    return_metrics: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the residual blocks, collecting optional features and signal metrics."""
    outputs = {}
    if return_features:
        outputs["stem"] = stem_out
    if return_metrics:
        outputs.update({f"stem/{k}": v for k, v in channel_stats(stem_out).items()})
    out = stem_out
    for i, block in enumerate(blocks):
        out, res_var = block(out, is_training)
        if return_metrics:
            outputs.update({f"block_{i}/{k}": v for k, v in channel_stats(out).items()})
            outputs[f"block_{i}/res_var"] = res_var
        if return_features and i in stage_ends:
            outputs[f"stage_{list(stage_ends).index(i)}"] = out
    return out, outputs


def classifier(num_classes: int, fc_init: hk.initializers.Initializer | None) -> hk.Linear:
    """The classifier ("linear", as in the release): w ~ N(0, 0.01) unless `fc_init`, b = 0."""
    fc_init = fc_init or hk.initializers.RandomNormal(stddev=0.01)
    return hk.Linear(num_classes, w_init=fc_init, with_bias=True, name="linear")


def classify(
    features: jax.Array,
    fc: hk.Linear,
    drop_rate: float,
    is_training: bool,
    outputs: dict[str, jax.Array],
) -> dict[str, jax.Array]:
    """Global average pool ("pool"), dropout when training, the classifier ("logits")."""
    pool = jnp.mean(features, axis=(1, 2))
    outputs["pool"] = pool
    if is_training and drop_rate > 0.0:
        pool = hk.dropout(hk.next_rng_key(), drop_rate, pool)
    outputs["logits"] = fc(pool)
    return outputs


class NFNet(hk.Module):
    """Normalizer-free network, variants F0-F7 and F0+-F7+ (`variants.NFNET`).

    Args:
      num_classes: classifier outputs.
      variant: a key of `variants.NFNET`.
      width: multiplier on the stage widths.
      se_ratio: squeeze-excite hidden width as a fraction of the block's output width.
      alpha: residual branch scale.
      stochdepth_rate: stochastic depth rate of the last block (linearly ramped from 0).
      drop_rate: dropout before the classifier; None takes the variant's.
      activation: a name from `activations.names()` (scaled by its gamma).
      fc_init: classifier weight initialiser; default N(0, 0.01).
      final_conv_mult: final conv channels = this * last stage width.
      final_conv_ch: overrides `final_conv_mult` when given.
      use_two_convs: the second grouped 3x3 conv (conv1b) of each block.
      group_conv: grouped-convolution strategy, see `layers.GROUP_CONV_STRATEGIES`.
      conv_grad: backward-pass implementation of the convolutions, see
        `layers.CONV_GRAD_IMPLS` ("auto": "matmul" on CPU, "xla" elsewhere); forward values
        do not depend on it.
      numerics: "reference" (tanh GELU, WS eps 1e-4 as a max) or "timm" (erf GELU, WS eps
        1e-5 added to the variance), to reproduce timm's logits for converted weights.
      in_channels: image channels the stem expects.
      depths, widths, group_width: override the variant's depth/width pattern and the
        group width (128), for small models.
      name: the root module name; keep "NFNet" to load released weights.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        variant: str = "F0",
        width: float = 1.0,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float | None = None,
        activation: str = "gelu",
        fc_init: hk.initializers.Initializer | None = None,
        final_conv_mult: float = 2,
        final_conv_ch: int | None = None,
        use_two_convs: bool = True,
        group_conv: str = "auto",
        conv_grad: str = "auto",
        numerics: str = "reference",
        in_channels: int = 3,
        depths: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        group_width: int = 128,
        name: str = "NFNet",
    ):
        super().__init__(name=name)
        spec = variants.lookup("NFNet", variant)
        if numerics not in NUMERICS:
            raise ValueError(f"Unknown numerics {numerics!r}; valid: {', '.join(NUMERICS)}.")
        layers.resolve_group_conv(group_conv)
        layers.resolve_conv_grad(conv_grad)
        gelu_name, ws_eps, ws_eps_mode = NUMERICS[numerics]
        if activation == "gelu":
            activation = gelu_name
        self.activation = activations.get(activation)
        self.num_classes = num_classes
        self.variant = variant
        self.in_channels = in_channels
        self.drop_rate = spec.drop_rate if drop_rate is None else drop_rate
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}.")
        depths = list(depths or spec.depths)
        widths = [int(w * width) for w in (widths or spec.widths)]
        if len(depths) != len(STRIDES) or len(widths) != len(STRIDES):
            raise ValueError(
                f"depths and widths need {len(STRIDES)} stages, got {depths} and {widths}."
            )
        conv_kwargs = dict(
            eps=ws_eps, eps_mode=ws_eps_mode, group_conv=group_conv, conv_grad=conv_grad
        )
        conv = lambda ch, k, stride, nm: layers.WSConv2D(ch, k, stride, name=nm, **conv_kwargs)

        self.stem = [
            conv(16, 3, 2, "stem_conv0"),
            conv(32, 3, 1, "stem_conv1"),
            conv(64, 3, 1, "stem_conv2"),
            conv(widths[0] // 2, 3, 2, "stem_conv3"),
        ]
        ch = widths[0] // 2
        self.blocks, self.stage_ends = [], []
        betas = [1.0 / s for s in expected_stds(depths, alpha)]
        num_blocks, index = sum(depths), 0
        for block_width, depth, stride in zip(widths, depths, STRIDES):
            for block_index in range(depth):
                self.blocks.append(
                    NFBlock(
                        ch,
                        block_width,
                        se_ratio=se_ratio,
                        group_size=group_width,
                        stride=stride if block_index == 0 else 1,
                        beta=betas[index],
                        alpha=alpha,
                        activation=activation,
                        conv_kwargs=conv_kwargs,
                        use_two_convs=use_two_convs,
                        stochdepth_rate=stochdepth_rate * index / num_blocks,
                        name="nf_block" if index == 0 else f"nf_block_{index}",
                    )
                )
                ch = block_width
                index += 1
            self.stage_ends.append(index - 1)
        ch = final_conv_ch if final_conv_ch is not None else int(final_conv_mult * ch)
        self.final_conv = conv(ch, 1, 1, "final_conv")
        self.fc = classifier(num_classes, fc_init)

    def __call__(
        self,
        x: jax.Array,
        is_training: bool = True,
        return_features: bool = False,
        return_metrics: bool = False,
    ) -> dict[str, jax.Array]:
        """Classifies NHWC images.

        Args:
          x: float images (N, H, W, in_channels), normalised.
          is_training: enables dropout and stochastic depth (needs an rng).
          return_features: also return "stem", "stage_0".."stage_3" feature maps.
          return_metrics: also return per-block signal-propagation statistics
            ("block_{i}/avg_sq_mean", "block_{i}/avg_var" of each block's output,
            "block_{i}/res_var" of its residual branch) and the stem's.

        Returns:
          A dict with "logits" (N, num_classes) and "pool" (N, final channels), plus the
          optional entries above.
        """
        check_images(x, self.in_channels, "NFNet")
        out = x
        for i, conv in enumerate(self.stem):
            out = conv(out) if i == 0 else conv(self.activation(out))
        out, outputs = run_body(
            out, self.blocks, self.stage_ends, is_training, return_features, return_metrics
        )
        out = self.activation(self.final_conv(out))
        return classify(out, self.fc, self.drop_rate, is_training, outputs)
