"""Normalizer-free pre-activation ResNets (Brock, De, Smith, ICLR 2021).

Same building blocks as NFNets (scaled WS convs, scaled ReLU, alpha/beta bookkeeping,
zero-initialised skip gain, optional squeeze-excite); module names follow the reference
release (root "NF_ResNet", blocks "nf_res_block", "nf_res_block_1", ...).
"""

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import activations, layers, nfnet, variants


class NFResBlock(hk.Module):
    """Pre-activation bottleneck: 1x1 -> 3x3 (strided) -> 1x1, strided 1x1 shortcut."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        bottleneck_ratio: float = 0.25,
        stride: int = 1,
        beta: float = 1.0,
        alpha: float = 0.2,
        activation: str = "relu",
        use_se: bool = False,
        se_ratio: float = 0.25,
        stochdepth_rate: float = 0.0,
        group_conv: str = "auto",
        conv_grad: str = "auto",
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.activation = activations.get(activation)
        self.beta, self.alpha, self.stochdepth_rate = beta, alpha, stochdepth_rate
        width = int(out_ch * bottleneck_ratio)
        conv = lambda ch, k, s, nm: layers.WSConv2D(
            ch, k, s, group_conv=group_conv, conv_grad=conv_grad, name=nm
        )
        self.conv0 = conv(width, 1, 1, "conv0")
        self.conv1 = conv(width, 3, stride, "conv1")
        self.conv2 = conv(out_ch, 1, 1, "conv2")
        use_projection = stride > 1 or in_ch != out_ch
        self.conv_shortcut = conv(out_ch, 1, stride, "conv_shortcut") if use_projection else None
        self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio) if use_se else None

    def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
        act = self.activation
        out = act(x) * self.beta
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
        out = self.conv0(out)
        out = self.conv1(act(out))
        out = self.conv2(act(out))
        if self.se is not None:
            out = 2 * self.se(out) * out
        res_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
        out = layers.stochastic_depth(out, self.stochdepth_rate, is_training)
        out = out * hk.get_parameter("skip_gain", (), out.dtype, init=jnp.zeros)
        return out * self.alpha + shortcut, res_var


class NFResNet(hk.Module):
    """NF-ResNet-26/50/101/152/200 (also 288/600), widths 4 x [64, 128, 256, 512].

    Args:
      num_classes: classifier outputs.
      variant: a key of `variants.NFRESNET`.
      width: width multiplier on [64, 128, 256, 512] (4 gives the standard ResNet).
      alpha: residual branch scale.
      stochdepth_rate: stochastic depth rate of the last block (linearly ramped from 0).
      drop_rate: dropout before the classifier (the reference has no per-variant default).
      activation: a name from `activations.names()`.
      fc_init: classifier weight initialiser; default N(0, 0.01).
      use_se, se_ratio: squeeze-excite in every block.
      group_conv: accepted for symmetry with NFNet (NF-ResNets have no grouped convs).
      conv_grad: backward-pass implementation of the convolutions (`layers.CONV_GRAD_IMPLS`).
      in_channels: image channels the stem expects.
      depths: overrides the variant's depth pattern.
      name: root module name, "NF_ResNet" as in the reference.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        variant: str = "ResNet50",
        width: int = 4,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float = 0.0,
        activation: str = "relu",
        fc_init: hk.initializers.Initializer | None = None,
        use_se: bool = False,
        se_ratio: float = 0.25,
        group_conv: str = "auto",
        conv_grad: str = "auto",
        in_channels: int = 3,
        depths: Sequence[int] | None = None,
        name: str = "NF_ResNet",
    ):
        super().__init__(name=name)
        spec = variants.lookup("NFResNet", variant)
        depths = list(depths or spec.depths)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
        self.activation = activations.get(activation)
        self.drop_rate, self.in_channels = drop_rate, in_channels
        ch = int(16 * width)
        self.initial_conv = layers.WSConv2D(
            ch, 7, 2, with_bias=False, conv_grad=conv_grad, name="initial_conv"
        )
        self.blocks, self.stage_ends = [], []
        betas = [1.0 / s for s in nfnet.expected_stds(depths, alpha)]
        num_blocks, index = sum(depths), 0
        # The table's widths are the standard width-4 ones: 4 x (64, 128, 256, 512).
        base_widths = [w // 4 for w in spec.widths]
        for base, depth, stride in zip(base_widths, depths, nfnet.STRIDES):
            for block_index in range(depth):
                self.blocks.append(
                    NFResBlock(
                        ch,
                        base * width,
                        stride=stride if block_index == 0 else 1,
                        beta=betas[index],
                        alpha=alpha,
                        activation=activation,
                        use_se=use_se,
                        se_ratio=se_ratio,
                        stochdepth_rate=stochdepth_rate * index / num_blocks,
                        group_conv=group_conv,
                        conv_grad=conv_grad,
                        name="nf_res_block" if index == 0 else f"nf_res_block_{index}",
                    )
                )
                ch = base * width
                index += 1
            self.stage_ends.append(index - 1)
        self.fc = nfnet.classifier(num_classes, fc_init)

    def __call__(
        self,
        x: jax.Array,
        is_training: bool = True,
        return_features: bool = False,
        return_metrics: bool = False,
    ) -> dict[str, jax.Array]:
        """Classifies NHWC images; outputs as `NFNet.__call__`."""
        nfnet.check_images(x, self.in_channels, "NFResNet")
        out = self.initial_conv(x)
        out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
        out, outputs = nfnet.run_body(
            out, self.blocks, self.stage_ends, is_training, return_features, return_metrics
        )
        return nfnet.classify(self.activation(out), self.fc, self.drop_rate, is_training, outputs)
