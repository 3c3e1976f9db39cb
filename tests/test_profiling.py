"""Tests of the per-op-kind step profile (nfnets_jax/bench/profile.py, scripts/profile_step.py)."""

import dataclasses

import pytest

from nfnets_jax.bench import profile as bench_profile
from nfnets_jax.bench import step

TINY = dict(widths=[32, 64, 128, 128], group_width=16, depths=[1, 1, 1, 1])

HLO = """HloModule m

%fused_conv (p0: f32[8,8,8,4], p1: f32[3,3,4,4]) -> f32[8,8,8,4] {
  %p0 = f32[8,8,8,4]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,4,4]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[8,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, {CONV}
}

%wgrad (p0: f32[4,8,8,8], p1: f32[8,8,8,4]) -> f32[4,3,3,4] {
  %p0 = f32[4,8,8,8]{3,2,1,0} parameter(0)
  %p1 = f32[8,8,8,4]{3,2,1,0} parameter(1)
  ROOT %convolution.2 = f32[4,3,3,4]{3,2,1,0} convolution(%p0, %p1), window={size=8x8}, {CONV}
}

ENTRY %main (a: f32[8,8,8,4], b: f32[3,3,4,4]) -> f32[8,8,8,4] {
  %a = f32[8,8,8,4]{3,2,1,0} parameter(0)
  %b = f32[3,3,4,4]{3,2,1,0} parameter(1)
  %ynn_fusion.3 = f32[8,8,8,4]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_conv
  %ynn_fusion.4 = f32[4,3,3,4]{3,2,1,0} fusion(%a, %a), kind=kCustom, calls=%wgrad
  %cv.8 = f32[8,8,8,4]{3,2,1,0} convolution(%a, %b), window={size=3x3 lhs_dilate=2x2},{CONV}
  %cv.9 = f32[4,3,3,4]{3,2,1,0} convolution(%a, %a), window={size=8x8}, {CONV}
  %dot.5 = f32[4,4]{1,0} dot(%b, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %concatenate.6 = f32[8,8,8,8]{3,2,1,0} concatenate(%a, %a), dimensions={3}
  ROOT %transpose_copy_fusion.7 = f32[8,8,8,4]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_conv
}
""".replace("{CONV}", "dim_labels=b01f_01io->b01f")


def test_categorize_reads_the_hlo():
    instructions, computations = bench_profile.hlo_index(HLO)
    cat = lambda name: bench_profile.categorize(name, instructions, computations)
    assert cat("ynn_fusion.3") == "conv 3x3"
    assert cat("ynn_fusion.4") == "conv weight-grad (XLA)"
    # Convolutions outside fusions are read from their own line.
    assert cat("cv.8") == "conv 3x3 (input grad)"
    assert cat("cv.9") == "conv weight-grad (XLA)"
    assert cat("dot.5") == "dot"
    assert cat("concatenate.6") == "concatenate"
    assert cat("not_in_the_module") == "other"


@pytest.mark.slow
def test_profile_step_tiny_shows_what_matmul_grads_remove():
    base = step.BenchmarkConfig(
        batch_size=2, train_resolution=32, model_kwargs=TINY, group_conv="split"
    )
    results = {
        impl: bench_profile.profile_mode(dataclasses.replace(base, conv_grad=impl), "grad", 1)
        for impl in ("xla", "matmul")
    }
    for result in results.values():
        assert result["wall_s"] > 0 and result["thunk_s"] > 0
        shares = [row["share"] for row in result["categories"]]
        assert sum(shares) == pytest.approx(1.0)
        assert shares == sorted(shares, reverse=True)
        assert any(row["category"].startswith("conv 3x3") for row in result["categories"])
        text = bench_profile.format_profile(result, "tiny")
        assert "wall time per call" in text and "conv 3x3" in text
    thunks = lambda impl, category: sum(
        row["thunks"] for row in results[impl]["categories"] if row["category"] == category
    )
    # XLA's autodiff computes weight gradients as feature-map-sized convolutions; the
    # matmul backward pass keeps them for 3x3 kernels only (1x1: matrix products).
    assert 0 < thunks("matmul", "conv weight-grad (XLA)") < thunks("xla", "conv weight-grad (XLA)")
    assert thunks("matmul", "dot") > thunks("xla", "dot")
