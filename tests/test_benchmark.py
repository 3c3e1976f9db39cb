"""Tests of the step benchmark (nfnets_jax/bench/step.py, scripts/benchmark.py).

Everything runs at a tiny size: a 4-block NFNet at 32 px, batch 2, one timed call.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from nfnets_jax import files
from nfnets_jax.bench import step, step_report, timing, timm_model
from nfnets_jax.models import counting, registry

TINY = dict(widths=[32, 64, 128, 128], group_width=16, depths=[1, 1, 1, 1])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides) -> step.BenchmarkConfig:
    fields = dict(
        batch_size=2,
        inference_resolution=32,
        train_resolution=32,
        iters=1,
        repeats=1,
        warmup=0,
        model_kwargs=TINY,
        modes=("inference", "train"),
    )
    fields.update(overrides)
    return step.BenchmarkConfig(**fields)


def tiny_macs() -> int:
    return counting.model_counts(registry.build_forward("NFNet", variant="F0", **TINY), 32)["macs"]


def check_row(row: dict, macs: int) -> None:
    assert row["time_s"] > 0 and all(t > 0 for t in row["times_s"])
    assert row["compile_s"] > 0
    assert row["peak_memory_bytes"] > 0
    assert row["macs_per_image"] == macs
    if row["mode"] in ("inference", "train", "grad"):
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["time_s"])
        factor = 1 if row["mode"] == "inference" else 3
        assert row["flops_per_s"] == pytest.approx(
            2 * factor * macs * row["batch_size"] / row["time_s"]
        )
    assert row["mfu"] is None  # No peak is known for a CPU.


@pytest.mark.slow
def test_jax_benchmark_tiny_reports_sane_rows(tmp_path):
    # Same programs as the script test below, which then finds them in the compilation cache.
    config = tiny_config(
        modes=("inference", "train", "optimizer"), group_conv="native", conv_grad="matmul"
    )
    result = step.run([config])
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"inference", "train", "optimizer"}
    macs = tiny_macs()
    for row in rows.values():
        assert row["framework"] == "jax" and row["group_conv"] == "native"
        assert row["conv_grad"] == "matmul"
        check_row(row, macs)
    assert rows["inference"]["resolution"] == 32 and rows["train"]["batch_size"] == 2
    assert rows["train"]["xla_memory_bytes"] > 0
    share = result["optimizer_share"][0]
    assert share["share"] == pytest.approx(rows["optimizer"]["time_s"] / rows["train"]["time_s"])
    table = step_report.format_table(result)
    assert "inference" in table and "train" in table and "optimizer (AGC" in table
    path = tmp_path / "bench.json"
    files.write_json(str(path), result)
    assert json.loads(path.read_text())["rows"][0]["macs_per_image"] == macs


@pytest.mark.slow
def test_script_compare_timm_tiny(tmp_path):
    available, reason = timm_model.available()
    if not available:
        pytest.skip(reason)
    path = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "benchmark.py"),
        "--resolution=32",
        "--batch_size=2",
        "--repeats=2",
        "--warmup=0",
        "--modes=inference,train",
        "--group_conv=native",
        "--conv_grad=matmul",
        "--compare=timm",
        f"--json={path}",
        "--model_kwargs=" + json.dumps(TINY),
    ]
    env = dict(os.environ)
    # Reuse the test session's compilation cache (conftest) in the subprocess.
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio jax/timm inference" in proc.stdout
    assert "ratio jax/timm train" in proc.stdout
    result = json.loads(path.read_text())
    macs = tiny_macs()
    frameworks = {(r["framework"], r["mode"]) for r in result["rows"]}
    assert frameworks == {
        ("jax", "inference"),
        ("jax", "train"),
        ("timm", "inference"),
        ("timm", "train"),
    }
    for row in result["rows"]:
        check_row(row, macs)
        assert len(row["times_s"]) == 2
    assert {r["mode"] for r in result["ratios"]} == {"inference", "train"}
    assert {r["conv_grad"] for r in result["rows"]} == {"matmul", "-"}
    for ratio in result["ratios"]:
        assert ratio["conv_grad"] == "matmul"
        assert ratio["ratio"] == pytest.approx(ratio["jax_s"] / ratio["timm_s"])
        assert ratio["paired_ratio"] > 0
    assert result["environment"]["torch_threads"] == timing.cpu_cores()


def test_timm_model_matches_tiny_shape():
    available, reason = timm_model.available()
    if not available:
        pytest.skip(reason)
    model = timm_model.make_model(tiny_config(), is_training=False)
    assert [len(stage) for stage in model.stages] == TINY["depths"]
    assert model.num_features == 2 * TINY["widths"][-1]


def test_remat_puts_each_block_under_checkpoint():
    config = tiny_config(remat=True)
    transformed = config.model()
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
    params = jax.eval_shape(
        lambda r, x: transformed.init(r, x, True), jax.random.PRNGKey(0), images
    )
    apply = lambda p, x, training: transformed.apply(p, jax.random.PRNGKey(0), x, training)
    for training, expected in ((True, sum(TINY["depths"])), (False, 0)):
        jaxpr = jax.make_jaxpr(lambda p, x, t=training: apply(p, x, t))(params, images)
        # jax.checkpoint's primitive ("remat2" in this jax; "checkpoint" in others).
        names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
        found = sum(name in ("checkpoint", "remat", "remat2") for name in names)
        assert found == expected, sorted(set(names))


def test_peak_flops_table():
    assert timing.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert timing.peak_flops("TPU v4", "bfloat16") == 275e12
    assert timing.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert timing.peak_flops("Tesla V100-SXM2-16GB", "float32") == 15.7e12
    assert timing.peak_flops("cpu", "float32") is None


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="Unknown benchmark modes \\['fwd'\\]"):
        tiny_config(modes=("fwd",))
    with pytest.raises(ValueError, match="Unknown dtype 'float16'"):
        tiny_config(dtype="float16")
    with pytest.raises(ValueError, match="Unknown group_conv strategy 'grouped'"):
        tiny_config(group_conv="grouped")
    with pytest.raises(ValueError, match="Unknown conv_grad implementation 'cudnn'"):
        tiny_config(conv_grad="cudnn")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tiny_config(batch_size=0)
    with pytest.raises(ValueError, match="Unknown NFNet variant 'F9'"):
        tiny_config(variant="F9")


def test_timm_has_no_plus_variants():
    available, reason = timm_model.available()
    if not available:
        pytest.skip(reason)
    with pytest.raises(ValueError, match="timm has no 'dm_nfnet_f0\\+' equivalent"):
        timm_model.make_model(tiny_config(variant="F0+"), is_training=False)


def test_build_configs_crosses_strategies_and_remat():
    configs = step.build_configs(["native", "dense"], [False, True], batch_size=4)
    assert [(c.group_conv, c.remat) for c in configs] == [
        ("native", False),
        ("native", True),
        ("dense", False),
        ("dense", True),
    ]
    assert all(c.batch_size == 4 for c in configs)
    configs = step.build_configs(["split"], conv_grads=["xla", "matmul"])
    assert [(c.group_conv, c.conv_grad) for c in configs] == [("split", "xla"), ("split", "matmul")]


def test_round_robin_rotates_the_order_every_round():
    calls = []

    def item(name):
        def call(carry):
            calls.append(name)
            return np.zeros(())

        return timing.Timed(name, call)

    items = [item(n) for n in "abc"]
    timing.round_robin(items, repeats=4, warmup=1, iters=1)
    assert calls[:3] == list("abc")  # Warm-up, in order.
    assert calls[3:] == list("abcbcacababc")
    assert all(len(i.times) == 4 for i in items)
