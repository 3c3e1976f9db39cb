"""Tests for timm interop: key/layout conversion (numpy only) and logits parity (torch+timm)."""

import jax
import numpy as np
import pytest

from nfnets_jax.checkpoints import errors, loading, timm_convert, tree
from nfnets_jax.models import registry


@pytest.fixture(scope="module")
def f0_params():
    # Random values in the exact F0 tree (eval_shape, so nothing is compiled).
    rng = np.random.default_rng(0)
    shapes = tree.expected_shapes("F0")
    return {
        m: {p: rng.standard_normal(s, dtype=np.float32) for p, s in g.items()}
        for m, g in shapes.items()
    }


def test_round_trip_without_torch_is_exact(f0_params):
    sd = timm_convert.params_to_timm(f0_params)
    assert len(sd) == 233  # timm's dm_nfnet_f0 has 233 tensors.
    assert sd["stem.conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["stem.conv1.gain"].shape == (16, 1, 1, 1)
    assert sd["stages.2.0.conv2.weight"].shape == (768, 128, 3, 3)  # grouped: I = 128
    assert sd["stages.0.0.attn_last.fc1.weight"].shape == (128, 256, 1, 1)
    assert sd["head.fc.weight"].shape == (1000, 3072)
    assert sd["stages.3.2.skipinit_gain"].shape == ()
    np.testing.assert_array_equal(sd["head.fc.weight"], f0_params["NFNet/~/linear"]["w"].T)
    # Global block 9 is stage 3's first block (depths 1, 2, 6, 3).
    np.testing.assert_array_equal(
        sd["stages.3.0.downsample.conv.weight"][:, :, 0, 0],
        f0_params["NFNet/~/nf_block_9/~/conv_shortcut"]["w"][0, 0].T,
    )
    back = timm_convert.timm_to_params(sd)
    assert sorted(back) == sorted(f0_params)
    for module, group in f0_params.items():
        assert sorted(back[module]) == sorted(group)
        for name, value in group.items():
            assert back[module][name].dtype == value.dtype
            np.testing.assert_array_equal(back[module][name], value)


def test_unknown_and_missing_timm_keys_are_named(f0_params):
    sd = timm_convert.params_to_timm(f0_params)
    extra = dict(sd, **{"stages.0.0.attn.fc.weight": np.zeros((2, 2))})
    with pytest.raises(errors.CheckpointMismatchError, match=r"1 timm keys.*stages\.0\.0\.attn"):
        timm_convert.timm_to_params(extra)
    del sd["stages.1.1.conv2b.gain"]
    with pytest.raises(errors.CheckpointMismatchError, match=r"lacks stages\.1\.1\.conv2b\.gain"):
        timm_convert.timm_to_params(sd)
    with pytest.raises(errors.CheckpointMismatchError, match="not a timm NFNet"):
        timm_convert.timm_to_params(
            {k: v for k, v in sd.items() if not k.startswith("st")}
            | {"stem.conv1.weight": sd["stem.conv1.weight"]}
        )


@pytest.fixture(scope="module")
def timm_module():
    try:
        return timm_convert.import_timm()
    except ImportError as e:
        pytest.skip(f"PyTorch/timm not installed ({e}); install nfnets_jax[torch].")


@pytest.mark.slow
def test_timm_f0_logits_match_and_round_trip(timm_module, tmp_path):
    import torch

    torch.manual_seed(0)
    model = timm_module.create_model("dm_nfnet_f0", pretrained=False).eval()
    with torch.no_grad():
        # Random init leaves skip gains at 0 (every residual branch off): perturb all the
        # scalars so that every parameter influences the logits.
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.uniform_(0.5, 1.0)
            elif name.endswith("gain"):
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
        images = torch.randn(2, 3, 64, 64)
        want = model(images).numpy()

    state_dict = model.state_dict()
    params = timm_convert.timm_to_params(state_dict)
    tree.validate(params, "F0")
    assert tree.detect_variant(params) == "F0"
    nhwc = images.numpy().transpose(0, 2, 3, 1)
    apply = registry.logits_fn("NFNet", variant="F0", numerics="timm", group_conv="native")
    got = np.asarray(jax.jit(apply)(params, nhwc))
    scale = np.abs(want).max()
    assert scale > 0.05
    assert np.abs(got - want).max() / scale < 1e-4
    # Reverse: exact tensors, loadable strictly into a fresh timm model.
    back = timm_convert.params_to_timm(params)
    assert sorted(back) == sorted(state_dict)
    for key, tensor in state_dict.items():
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], tensor.numpy(), err_msg=key)
    model.load_state_dict(timm_convert.to_torch(back), strict=True)

    # Files: timm .pth files load through the generic loader (torch.load weights_only).
    path = str(tmp_path / "dm_nfnet_f0.pth")
    timm_convert.save_timm_checkpoint(params, path)
    assert loading.sniff_format(path) == "torch"
    loaded = loading.load_params(path)
    for module, group in params.items():
        for name, value in group.items():
            np.testing.assert_array_equal(loaded[module][name], value)


def test_torchvision_shim_is_idempotent(timm_module):
    # After import_timm, asking again registers nothing new and timm stays importable.
    first = timm_convert.register_torchvision_stubs()
    assert timm_convert.register_torchvision_stubs() == first
    assert "dm_nfnet_f0" in timm_module.list_models("dm_nfnet_f*")
