"""End-to-end trainer tests on 8 fake CPU devices with the tiny digits config (configs/tiny.py).

Compilations are the cost on a 2-core CPU, so the runs share one module-scoped baseline run
(4 steps, checkpoints at 2 and 4) and reuse its compiled step through the persistent cache.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from tiny_run import REPO, TINY, assert_trees_equal, tiny_config

from nfnets_jax import configlib, files, metrics, parallel, train
from nfnets_jax.checkpoints import workdir as workdir_ckpt
from nfnets_jax.train import loop, recipe, resume, steps, storage

# One worker runs this whole module (scripts/test.sh: --dist loadgroup), so the module-scoped
# baseline run below is trained once, not once per worker.
pytestmark = pytest.mark.xdist_group("trainer")


def subprocess_env(device_count):
    env = dict(os.environ)
    # The suite's XLA flags (see conftest.py) with this process's device count: the same
    # backend options, so the same bits as the in-process runs.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={device_count}"] + flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("baseline"))
    return workdir, train.train_and_evaluate(tiny_config(), workdir)


def test_trains_with_finite_loss_and_identical_replicas(baseline):
    workdir, results = baseline
    assert results["step"] == 4 and not results["preempted"]
    assert np.isfinite(results["train"]["loss"])
    assert results["replicas_identical"]
    # The whole test split counts once (360 digits), for raw and EMA weights.
    for split in ("eval", "eval_ema"):
        assert results[split]["count"] == 360
        assert 0.0 <= results[split]["top1"] <= results[split]["top5"] <= 1.0
    state = results["state"]
    assert int(state.step) == 4
    w = state.params["NFNet/~/linear"]["w"]
    assert not np.array_equal(w, state.ema_params["NFNet/~/linear"]["w"])
    assert workdir_ckpt.Checkpointer(workdir).all_steps() == [2, 4]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_records = [r for r in records if r["split"] == "train"]
    assert {
        "loss",
        "grad_norm",
        "param_norm",
        "update_norm",
        "agc_clipped_fraction",
        "learning_rate",
    } <= set(train_records[-1])
    assert {r["split"] for r in records} == {"train", "eval", "eval_ema"}
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["plan"]["total_steps"] == 4


def test_per_device_rngs_differ_and_ema_follows_formula(monkeypatch):
    # The trainer's pmapped train_step on all 8 devices, the same images and labels on every
    # device and dropout + stochastic depth on: only the per-device RNG can make the devices'
    # losses and gradients differ. A spy on parallel.pmean (the step itself is unchanged)
    # also returns each device's gradients and loss from before the cross-device mean.
    config = tiny_config()
    assert config.model.drop_rate > 0 and config.model.stochdepth_rate > 0
    rec = recipe.build_recipe(config, (10, 1437))
    real_pmean = parallel.pmean
    pending = {}

    def spy(tree):
        if "loss" not in tree:  # The gradients (the step's first pmean): hold on to them.
            pending["grads"] = tree
            return real_pmean(tree)
        return {
            **real_pmean(tree),
            "device_loss": tree["loss"],
            "device_grads": pending.pop("grads"),
        }

    monkeypatch.setattr(parallel, "pmean", spy)
    n = jax.local_device_count()
    rng = np.random.default_rng(0)
    per_device = parallel.per_device_batch_size(config.batch_size)
    images = rng.standard_normal((per_device, 32, 32, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, per_device)]
    batch = jax.tree.map(
        lambda x: np.broadcast_to(x, (n, *x.shape)), {"images": images, "labels": labels}
    )

    def run():
        # A fresh state and a freshly traced step per run, as a new process would have,
        # bound as train_and_evaluate binds it.
        p_train = parallel.pmap(steps.bind_train_step(rec), donate_argnums=(0,))
        state = parallel.replicate(
            steps.create_train_state(rec.model, rec.optimizer, 32, config.seed)
        )
        return jax.device_get(p_train(state, parallel.shard(batch), parallel.per_device_value(0)))

    state, metrics = run()
    losses = metrics.pop("device_loss")
    assert len(set(losses.tolist())) == n, losses
    device_grads = metrics.pop("device_grads")
    for path in ("NFNet/~/linear", "NFNet/~/stem_conv0"):
        w = device_grads[path]["w"]
        assert len({w[i].tobytes() for i in range(n)}) == n, path
    # The update still uses the mean over devices: the replicas stay identical.
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
    for leaf in jax.tree.leaves(state):
        assert all(np.array_equal(leaf[0], leaf[i]) for i in range(1, n))
    # Same seed, same batch: the per-device values and the new state are reproduced exactly.
    state2, metrics2 = run()
    assert_trees_equal(losses, metrics2.pop("device_loss"))
    assert_trees_equal(device_grads, metrics2.pop("device_grads"))
    assert_trees_equal(metrics, metrics2)
    assert_trees_equal(state, state2)

    decays = np.asarray(steps.ema_decay(np.arange(3), 0.99999))
    np.testing.assert_allclose(decays, [1 / 10, 2 / 11, 3 / 12], rtol=1e-6)
    assert float(steps.ema_decay(np.asarray(10**7), 0.99999)) == pytest.approx(0.99999)


@pytest.mark.slow
def test_pmap_matches_single_device():
    # Without dropout / stochastic depth the update depends only on the global batch.
    config = tiny_config(**{"model.drop_rate": 0.0, "model.stochdepth_rate": 0.0})
    rec = recipe.build_recipe(config, (10, 1437))
    state = steps.create_train_state(rec.model, rec.optimizer, 32, seed=0)
    batches = rec.train_batches(0)
    batches = [next(batches) for _ in range(2)]

    def run(devices, state):
        n = len(devices)
        fn = jax.pmap(
            steps.bind_train_step(rec),
            axis_name=parallel.AXIS_NAME,
            devices=devices,
        )
        state = jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), state)
        for batch in batches:
            batch = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[2:]), batch)
            # Host round trip: identical input types each step, so a single compilation.
            state, metrics = jax.device_get(fn(state, batch, np.zeros((n,), np.int32)))
        return jax.device_get(jax.tree.map(lambda x: x[0], state)), jax.device_get(metrics)

    single, single_metrics = run(jax.local_devices()[:1], state)
    multi, multi_metrics = run(jax.local_devices(), state)
    assert jax.device_count() == 8
    np.testing.assert_allclose(single_metrics["loss"][0], multi_metrics["loss"][0], rtol=1e-5)
    assert_trees_equal(single.params, multi.params, rtol=2e-5, atol=2e-7)
    assert_trees_equal(single.opt_state, multi.opt_state, rtol=2e-4, atol=2e-7)


def test_sigterm_saves_checkpoint_and_resume_matches(baseline, tmp_path):
    _, expected = baseline
    workdir = str(tmp_path)
    config = tiny_config(checkpoint_every_steps=0)

    def hook(step):
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train.train_and_evaluate(config, workdir, step_hook=hook)
    assert stopped["preempted"] and stopped["step"] < 4
    assert workdir_ckpt.Checkpointer(workdir).latest_step() == stopped["step"]
    resumed = train.train_and_evaluate(config, workdir)
    assert resumed["step"] == 4 and not resumed["preempted"]
    assert_trees_equal(resumed["state"], expected["state"])


@pytest.mark.slow
def test_killed_run_resumes_to_same_parameters(baseline, tmp_path):
    _, expected = baseline
    workdir = str(tmp_path)
    code = textwrap.dedent(f"""
        import os, signal
        from nfnets_jax import configlib, train
        def hook(step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        train.train_and_evaluate(configlib.load_config_file({TINY!r}), {workdir!r},
                                 step_hook=hook)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert workdir_ckpt.Checkpointer(workdir).latest_step() == 2
    resumed = train.train_and_evaluate(tiny_config(), workdir)
    assert resumed["step"] == 4
    assert_trees_equal(resumed["state"], expected["state"])


def _assert_good_checkpoints(workdir, config, failed_before):
    checkpointer = workdir_ckpt.Checkpointer(workdir)
    saved = checkpointer.all_steps()
    assert saved and saved[-1] < failed_before
    rec = recipe.build_recipe(config, (10, 1437))
    template = steps.create_train_state(rec.model, rec.optimizer, 32, 0)
    restored = checkpointer.restore(template._asdict())
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored["params"]))


def test_nan_input_stops_with_message_and_keeps_good_checkpoint(tmp_path, monkeypatch):
    real_iterator = recipe.Recipe.train_batches

    def poisoned(self, start_step, **kwargs):
        for step, batch in enumerate(real_iterator(self, start_step, **kwargs)):
            if start_step + step == 2:
                batch = dict(batch, images=np.full_like(batch["images"], np.nan))
            yield batch

    monkeypatch.setattr(recipe.Recipe, "train_batches", poisoned)
    config = tiny_config(checkpoint_every_steps=1)
    with pytest.raises(
        loop.NonFiniteLossError, match=r"Non-finite loss \(nan.*\) at step 3: stopping"
    ) as info:
        train.train_and_evaluate(config, str(tmp_path))
    assert "The last good checkpoint is step 2" in str(info.value)
    _assert_good_checkpoints(str(tmp_path), config, failed_before=3)


def test_batch_not_divisible_by_device_count_is_rejected():
    with pytest.raises(
        ValueError, match="Global batch size 12 is not divisible by the total device count 8"
    ):
        recipe.make_plan(tiny_config(batch_size=12), 10, 1437)


def test_checkpointer_keeps_last_n_and_ignores_partial_saves(tmp_path):
    checkpointer = workdir_ckpt.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, {"w": np.full((2,), step, np.float32)})
    # A save killed half way leaves only a temporary directory, never restored.
    os.makedirs(os.path.join(checkpointer.directory, "4.orbax-checkpoint-tmp-123"))
    reopened = workdir_ckpt.Checkpointer(str(tmp_path), keep=2)
    assert reopened.all_steps() == [2, 3]
    restored = reopened.restore({"w": np.zeros((2,), np.float32)})
    np.testing.assert_array_equal(restored["w"], [3.0, 3.0])
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        workdir_ckpt.Checkpointer(str(tmp_path / "empty")).restore({"w": np.zeros(2)})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_match_single_process(tmp_path, monkeypatch):
    # As on a TPU pod slice: a gs:// workdir (a local stand-in for Cloud Storage, which the
    # processes reach through the environment that fake_gcs.start() set).
    import fake_gcs

    fake_gcs.start()
    workdir = f"gs://{fake_gcs.BUCKET}/two-processes/{tmp_path.name}"
    port = _free_port()
    procs = []
    for process_id in range(2):
        command = [
            sys.executable,
            os.path.join(REPO, "tests", "fake_gcs.py"),
            os.path.join(REPO, "scripts", "train.py"),
            f"--config={TINY}",
            f"--workdir={workdir}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
            "--cpu_collectives=gloo",
        ]
        procs.append(
            subprocess.Popen(
                command,
                env=subprocess_env(4),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "Replicas diverged" not in out

    config = tiny_config()
    tiny = recipe.build_recipe(config, (10, 1437))
    # Each process reads its own, disjoint shard of every global batch.
    shards = [
        tiny.train_batches(0, process_index=i, process_count=2, local_device_count=4)
        for i in range(2)
    ]
    seen = [[next(s) for _ in range(4)] for s in shards]
    images = [np.concatenate([b["images"].reshape(-1, 32 * 32 * 3) for b in s]) for s in seen]
    rows = [{r.tobytes() for r in imgs} for imgs in images]
    assert not rows[0] & rows[1]

    # One process on the union of the two shards reproduces the two-process run.
    real_iterator = recipe.Recipe.train_batches

    def union_iterator(self, start_step, **kwargs):
        its = [
            real_iterator(self, start_step, process_index=i, process_count=2, local_device_count=4)
            for i in range(2)
        ]
        while True:
            parts = [next(it) for it in its]
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    monkeypatch.setattr(recipe.Recipe, "train_batches", union_iterator)
    single = train.train_and_evaluate(config, str(tmp_path / "single"))
    template = steps.create_train_state(tiny.model, tiny.optimizer, 32, 0)
    multi = workdir_ckpt.Checkpointer(workdir).restore(template._asdict())
    assert int(multi["step"]) == 4
    assert_trees_equal(multi["params"], single["state"].params, rtol=1e-5, atol=1e-6)
    evals = metrics.read_metrics(workdir)["eval"]
    assert evals[-1]["count"] == 360
    assert evals[-1]["top1"] == pytest.approx(single["eval"]["top1"], abs=1 / 360 + 1e-9)


def test_unsupported_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = configlib.load_config_file(TINY)
    with pytest.raises(ValueError, match="'s3://bucket/run': the URL scheme s3:// is not"):
        train.train_and_evaluate(config, "s3://bucket/run")
    assert os.listdir(tmp_path) == []  # no local "gs:" directory was created


def test_bad_variant_fails_before_data_is_read_or_anything_written(tmp_path, monkeypatch):
    def no_data(config):
        raise AssertionError("the dataset was opened before the config was validated")

    monkeypatch.setattr(recipe, "dataset_info", no_data)
    with pytest.raises(ValueError, match="Unknown NFNet variant 'F9'; valid variants: F0, F0"):
        train.train_and_evaluate(tiny_config(**{"model.variant": "F9"}), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_missing_eval_split_fails_at_start_up():
    with pytest.raises(
        ValueError,
        match=r"Dataset 'digits' has no split 'validation'; "
        r"available: \['test', 'train'\]",
    ):
        recipe.dataset_info(tiny_config(eval_split="validation"))


def _copy_workdir(baseline, tmp_path):
    workdir = str(tmp_path / "resumed")
    shutil.copytree(baseline[0], workdir)
    return workdir


def _snapshot(workdir):
    return {
        name: open(os.path.join(workdir, name), "rb").read()
        for name in ("config.json", "metrics.jsonl")
    }


def test_resume_with_another_model_or_optimizer_is_refused_before_any_write(baseline, tmp_path):
    workdir = _copy_workdir(baseline, tmp_path)
    before = _snapshot(workdir)
    config = tiny_config(
        **{"model.widths": (64, 32, 32, 32), "sam.enabled": True, "log_every_steps": 2}
    )
    with pytest.raises(resume.ConfigMismatchError) as info:
        train.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "holds checkpoint 4" in message
    assert "config.model.widths: [32, 32, 32, 32] -> [64, 32, 32, 32]" in message
    assert "config.sam.enabled: False -> True" in message
    assert "log_every_steps" not in message  # Harmless changes are not the problem.
    assert "new --workdir" in message and "--allow_config_change" in message
    assert _snapshot(workdir) == before  # config.json and metrics untouched.
    assert workdir_ckpt.Checkpointer(workdir).all_steps() == [2, 4]


def test_resume_with_harmless_changes_rewrites_config_atomically(baseline, tmp_path, monkeypatch):
    workdir = _copy_workdir(baseline, tmp_path)
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        if not os.path.basename(dst).startswith(storage.PROBE_PREFIX):  # Start-up probe.
            replaced.append((os.path.dirname(src), os.path.basename(dst)))
            assert json.load(open(src))["config"]["log_every_steps"] == 3  # Complete first.
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    config = tiny_config(log_every_steps=3, eval_every_steps=5, data_dir="/elsewhere/tfds")
    results = train.train_and_evaluate(config, workdir)
    assert results["step"] == 4  # Resumed at the end: nothing left to train.
    assert replaced == [(workdir, "config.json")]
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)["config"]
    assert (saved["log_every_steps"], saved["data_dir"]) == (3, "/elsewhere/tfds")
    assert not [name for name in os.listdir(workdir) if ".tmp" in name]


def test_check_resume_config_override_and_missing_record(tmp_path, caplog):
    config = tiny_config()
    plan = recipe.make_plan(config, 10, 1437)
    saved = resume.config_record(config, plan)
    files.write_json(str(tmp_path / "config.json"), saved)
    changed = resume.config_record(tiny_config(**{"model.group_width": 8}), plan)
    with pytest.raises(resume.ConfigMismatchError, match="config.model.group_width: 16 -> 8"):
        resume.check_resume_config(str(tmp_path), changed, checkpoint_step=4)
    resume.check_resume_config(str(tmp_path), changed, checkpoint_step=None)  # Nothing saved.
    with caplog.at_level("WARNING"):
        resume.check_resume_config(str(tmp_path), changed, 4, allow_config_change=True)
    assert "config.model.group_width: 16 -> 8" in caplog.text
    os.remove(tmp_path / "config.json")
    resume.check_resume_config(str(tmp_path), changed, checkpoint_step=4)  # Warns only.


def test_write_json_atomic_leaves_the_old_file_on_failure(tmp_path):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    path = str(tmp_path / "config.json")
    files.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="cannot serialise"):
        files.write_json(path, {"a": 2, "b": "x" * 10_000, "c": Unprintable()})
    assert files.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["config.json"]


def test_restore_refuses_a_checkpoint_of_other_shapes(tmp_path):
    checkpointer = workdir_ckpt.Checkpointer(str(tmp_path))
    checkpointer.save(1, {"head": {"w": np.zeros((4, 10), np.float32)}, "b": np.zeros(3)})
    with pytest.raises(
        ValueError,
        match=r"\['head'\]\['w'\]: \(4, 10\) saved, \(4, 5\) "
        r"expected",
    ):
        checkpointer.restore({"head": {"w": np.zeros((4, 5), np.float32)}, "b": np.zeros(3)})
