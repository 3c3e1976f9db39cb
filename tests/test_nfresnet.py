"""NF-ResNets: structure of the reference, forward pass, SE option."""

import haiku as hk
import jax
import jax.numpy as jnp
import pytest

from nfnets_jax.models import counting, nfresnet, registry


def _shapes(variant, **kwargs):
    fn = hk.transform(lambda x: nfresnet.NFResNet(1000, variant, **kwargs)(x, False))
    return jax.eval_shape(fn.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize(
    "variant, blocks",
    [("ResNet26", 8), ("ResNet50", 16), ("ResNet101", 33), ("ResNet152", 50), ("ResNet200", 66)],
)
def test_structure(variant, blocks):
    params = _shapes(variant)
    # initial conv + per block (skip gain, conv0, conv1, conv2) + 4 shortcuts + classifier
    assert len(params) == 1 + 4 * blocks + 4 + 1
    assert set(params["NF_ResNet/~/initial_conv"]) == {"w", "gain"}  # no bias, as the reference
    assert params["NF_ResNet/~/initial_conv"]["w"].shape == (7, 7, 3, 64)
    assert params["NF_ResNet/~/nf_res_block/~/conv1"]["w"].shape == (3, 3, 64, 64)
    assert params["NF_ResNet/~/nf_res_block/~/conv_shortcut"]["w"].shape == (1, 1, 64, 256)
    assert params["NF_ResNet/~/linear"]["w"].shape == (2048, 1000)


def test_resnet50_counts():
    counts = counting.model_counts(registry.build_forward("NFResNet", variant="ResNet50"), 224)
    # Same convolutions and classifier as a standard ResNet-50 (4.09 GMACs at 224 px).
    assert round(counts["macs"] / 1e9, 2) == 4.09
    assert counts["modules"] == 70


def test_squeeze_excite_option():
    params = _shapes("ResNet26", use_se=True, se_ratio=0.25)
    se = params["NF_ResNet/~/nf_res_block_3/~/squeeze_excite/~/linear"]["w"]
    assert se.shape == (512, 128)


def test_forward_and_errors():
    fn = hk.transform(
        lambda x: nfresnet.NFResNet(5, "ResNet26", width=1, drop_rate=0.2)(
            x, True, return_features=True
        )
    )
    x = jnp.ones((2, 32, 32, 3))
    params = jax.jit(fn.init)(jax.random.PRNGKey(0), x)
    out = jax.jit(fn.apply)(params, jax.random.PRNGKey(1), x)
    assert out["logits"].shape == (2, 5)
    assert out["stage_3"].shape == (2, 1, 1, 512)
    with pytest.raises(ValueError, match="Unknown NFResNet variant 'ResNet34'.*ResNet50"):
        _shapes("ResNet34")


def test_agc_mask_skips_exactly_the_classifier_weight():
    params = _shapes("ResNet26", use_se=True)
    mask = registry.agc_mask(params)
    unclipped = [m for m, leaves in mask.items() for name, v in leaves.items() if not v]
    assert unclipped == ["NF_ResNet/~/linear"]
    assert not mask["NF_ResNet/~/linear"]["w"] and mask["NF_ResNet/~/linear"]["b"]
