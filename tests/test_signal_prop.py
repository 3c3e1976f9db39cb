"""Signal propagation at initialisation, and the plot script."""

import subprocess
import sys

import numpy as np
import pytest

from nfnets_jax.models import registry, signal_prop


def test_expected_output_vars():
    np.testing.assert_allclose(signal_prop.expected_output_vars([1, 2], 0.2), [1.04, 1.04, 1.08])


def test_nf_resnet_tracks_the_expected_variance_per_block():
    stats = signal_prop.measure(
        registry.build_forward("NFResNet", variant="ResNet26", width=2),
        [2, 2, 2, 2],
        resolution=64,
        batch=8,
    )
    ratio = stats["avg_var"] / stats["expected_var"]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    # No mean shift builds up (what normalizer-free networks must avoid).
    assert np.all(stats["avg_sq_mean"] < 0.1)
    # Residual branches start near unit variance.
    assert np.all(np.abs(stats["res_var"][:4] - 1) < 0.3), stats["res_var"]


def test_nfnet_first_stage_tracks_and_skip_gain_zero_is_identity():
    tiny = dict(widths=[128, 256, 384, 384], depths=[2, 1, 1, 1], group_width=64)
    stats = signal_prop.measure(
        registry.build_forward("NFNet", variant="F0", **tiny),
        tiny["depths"],
        resolution=32,
        batch=8,
    )
    # Stage 1 has no average-pool shortcut: the expected curve holds there. (At stride-2
    # transitions the 2x2 average pool divides the variance of spatially white features.)
    ratio = stats["avg_var"][:2] / stats["expected_var"][:2]
    assert np.all(np.abs(ratio - 1) < 0.3), ratio
    zero = signal_prop.measure(
        registry.build_forward("NFNet", variant="F0", **tiny),
        tiny["depths"],
        resolution=32,
        batch=8,
        skip_gain=0.0,
    )
    # With zero skip gains block 1 (non-transition) passes its input through unchanged.
    assert zero["avg_var"][1] == pytest.approx(zero["avg_var"][0], rel=1e-6)


def test_plot_script_writes_png(tmp_path):
    out = tmp_path / "spp.png"
    subprocess.run(
        [
            sys.executable,
            "scripts/plot_signal_propagation.py",
            "--variant=ResNet26",
            "--resolution=32",
            "--batch=4",
            f"--out={out}",
        ],
        check=True,
        capture_output=True,
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
