"""The per-layer convolution benchmark (scripts/benchmark_layers.py) at a tiny size."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.bench import layers as bench_layers
from nfnets_jax.bench import step

_TINY = dict(widths=[16, 32, 32, 32], depths=[1, 2, 1, 1], group_width=8)


def _config(**kwargs):
    return step.BenchmarkConfig(batch_size=2, train_resolution=32, model_kwargs=_TINY, **kwargs)


def test_conv_layers_cover_every_weight_standardised_conv():
    config = _config()
    found = bench_layers.conv_layers(config)
    params = jax.eval_shape(
        lambda x: config.model().init(jax.random.PRNGKey(0), x, True), jnp.zeros((2, 32, 32, 3))
    )
    kernels = [v["w"].shape for v in params.values() if "w" in v and len(v["w"].shape) == 4]
    assert sum(found.values()) == len(kernels)
    assert sorted(
        (k.kernel, k.kernel, k.in_ch // k.groups, k.out_ch)
        for k, n in found.items()
        for _ in range(n)
    ) == sorted(kernels)


def test_conv_layers_of_f0():
    found = bench_layers.conv_layers(step.BenchmarkConfig(train_resolution=128))
    assert sum(found.values()) == 57
    # Stage 3: six blocks at 8 px, 768 channels in 6 groups; the first conv1 is strided.
    assert found[bench_layers.ConvLayer(8, 768, 768, 6, 3, 1)] == 11
    assert found[bench_layers.ConvLayer(16, 768, 768, 6, 3, 2)] == 1
    assert found[bench_layers.ConvLayer(128, 3, 16, 1, 3, 2, takes_images=True)] == 1
    assert [k for k in found if k.takes_images] == [
        bench_layers.ConvLayer(128, 3, 16, 1, 3, 2, takes_images=True)
    ]


@pytest.mark.parametrize(
    "layer",
    [
        bench_layers.ConvLayer(8, 8, 6, 2, 3, 2),  # Even size, stride 2: asymmetric SAME.
        bench_layers.ConvLayer(7, 4, 6, 1, 3, 1),
        bench_layers.ConvLayer(6, 4, 8, 1, 1, 1),
    ],
)
def test_jax_and_torch_calls_compute_the_same_gradients(layer):
    pytest.importorskip("torch")
    x, w, r = bench_layers._arrays(layer, 2, 0)
    dx, dw = bench_layers.jax_call(layer, x, w, r, "split", "matmul", True)()
    torch_dw = bench_layers.torch_call(layer, x, w, r, True)().numpy()
    np.testing.assert_allclose(np.asarray(dw).transpose(3, 2, 0, 1), torch_dw, rtol=1e-4, atol=1e-4)
    assert dx.shape == x.shape


def test_run_totals_and_table():
    pytest.importorskip("torch")
    result = bench_layers.run(_config(), ("xla", "matmul"), compare_torch=True, repeats=2, warmup=0)
    names = ["jax xla", "jax matmul", "torch"]
    assert result["implementations"] == names
    for row in result["layers"]:
        for name in names:
            assert len(row["times_ms"][name]) == 2 and row["median_ms"][name] > 0
    for name in names:
        expected = sum(r["count"] * np.median(r["times_ms"][name]) for r in result["layers"])
        assert result["total_ms"][name] == pytest.approx(expected)
    table = bench_layers.format_table(result)
    assert "ratio jax matmul / torch" in table
    assert len(table.splitlines()) == len(result["layers"]) + 6
    with pytest.raises(ValueError, match="Unknown conv_grad implementation 'fast'"):
        bench_layers.run(_config(), ("fast",))


def test_script_rejects_bad_flags():
    script = pathlib.Path(__file__).parents[1] / "scripts" / "benchmark_layers.py"
    out = subprocess.run(
        [sys.executable, str(script), "--conv_grad=fast"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "Unknown conv_grad implementation 'fast'" in out.stderr
