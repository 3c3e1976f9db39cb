"""A gs:// workdir end to end on a local stand-in for Google Cloud Storage (tests/fake_gcs.py):
train, resume, a refused config change, evaluate and predict through the scripts; and the
start-up check that the processes of a multi-process run share their workdir.

The two-process training run on a gs:// workdir is in test_train.py (it shares that module's
compiled steps).
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from tiny_run import REPO, assert_trees_equal, run_script, tiny_config

from nfnets_jax import files, metrics, train
from nfnets_jax.checkpoints import workdir as workdir_ckpt
from nfnets_jax.train import recipe, resume, steps, storage

pytestmark = pytest.mark.xdist_group("gcs")
RUN = "gs://nfnets-test/e2e/run"


@pytest.fixture(scope="module")
def gcs_run(tmp_path_factory):
    """4 tiny steps on RUN, then resumed to 6; and the same two starts in a local workdir."""
    import fake_gcs

    fake_gcs.start()
    first = train.train_and_evaluate(tiny_config(), RUN)
    listing = sorted(files.listdir(RUN))
    resumed = train.train_and_evaluate(tiny_config(num_train_steps=6), RUN)
    local = str(tmp_path_factory.mktemp("local"))
    train.train_and_evaluate(tiny_config(), local)
    local_resumed = train.train_and_evaluate(tiny_config(num_train_steps=6), local)
    return first, listing, resumed, (local, local_resumed)


def test_gcs_workdir_trains_and_resumes_as_a_local_workdir_does(gcs_run):
    first, listing, resumed, (local_dir, local) = gcs_run
    assert first["step"] == 4 and resumed["step"] == 6
    assert listing == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
    assert sorted(files.listdir(files.join(RUN, "checkpoints")), key=int) == ["2", "4", "6"]
    # The same bits as on a local disk (where resuming matches an uninterrupted run:
    # test_train.py), so the store neither loses nor changes anything across the restart.
    assert_trees_equal(resumed["state"], local["state"])
    assert resumed["eval_ema"] == local["eval_ema"]
    # The metrics of both starts are in one record, each step once, as locally.
    steps_in = {d: [r["step"] for r in metrics.read_metrics(d)["train"]] for d in (RUN, local_dir)}
    assert steps_in[RUN] == steps_in[local_dir] and steps_in[RUN][-1] == 6
    assert steps_in[RUN] == sorted(set(steps_in[RUN]))
    record = files.read_json(files.join(RUN, "config.json"))
    assert record["config"]["num_train_steps"] == 6
    events = files.listdir(files.join(RUN, "tensorboard"))
    assert events and all(name.startswith("events.out") for name in events)


def test_gcs_checkpoint_restores_through_the_checkpointer(gcs_run):
    *_, resumed, _ = gcs_run
    config = tiny_config()
    tiny = recipe.build_recipe(config, (10, 1437))
    template = steps.create_train_state(tiny.model, tiny.optimizer, 32, 0)._asdict()
    checkpointer = workdir_ckpt.Checkpointer(RUN)
    assert checkpointer.latest_step() == 6
    restored = checkpointer.restore(template)
    assert int(restored["step"]) == 6
    assert_trees_equal(restored["params"], resumed["state"].params)


def test_gcs_resume_with_another_model_is_refused_and_writes_nothing(gcs_run):
    before = files.read_bytes(files.join(RUN, "config.json"))
    checkpoints = files.listdir(files.join(RUN, "checkpoints"))
    changed = tiny_config(num_train_steps=8, **{"model.group_width": 8})
    with pytest.raises(resume.ConfigMismatchError, match="config.model.group_width: 16 -> 8"):
        train.train_and_evaluate(changed, RUN)
    assert files.read_bytes(files.join(RUN, "config.json")) == before
    assert files.listdir(files.join(RUN, "checkpoints")) == checkpoints
    assert not [n for n in files.listdir(RUN) if n.startswith(storage.PROBE_PREFIX)]


def test_gcs_workdir_evaluates_and_predicts_through_the_scripts(gcs_run, tmp_path, capsys):
    *_, resumed, _ = gcs_run
    assert run_script("evaluate", [f"--checkpoint={RUN}"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"workdir {RUN}: NFNet F0")
    assert "360" in out.strip().splitlines()[-1].split()  # The whole digits test split.
    # The EMA top-1 the trainer measured at its end, as a percentage in the table.
    assert f"{100 * resumed['eval_ema']['top1']:.2f}" in out

    from sklearn.datasets import load_digits

    digits = load_digits()
    path = str(tmp_path / "seven.png")
    pixels = np.round(digits.images[digits.target == 7][0] * 255 / 16).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    assert run_script("predict", [f"--checkpoint={RUN}", "--top_k=3", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"workdir {RUN}: NFNet F0") and lines[1] == path
    assert [line.strip()[:2] for line in lines[2:5]] == ["1.", "2.", "3."]


_CHECK = textwrap.dedent(
    """
    import sys
    import jax
    jax.distributed.initialize(
        f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2])
    )
    from nfnets_jax.train import storage
    try:
        print("OK", storage.check_workdir(sys.argv[3], wait_s=1.0))
    except storage.WorkdirError as e:
        print("ERROR", e)
    """
)


def _check_in_two_processes(workdirs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHECK, str(port), str(i), workdirs[i]],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out.strip().splitlines()[-1] for out, _ in outputs]


def test_a_local_workdir_per_host_is_refused_on_every_process(tmp_path):
    own = [str(tmp_path / "host0" / "run"), str(tmp_path / "host1" / "run")]
    lines = _check_in_two_processes(own)
    for line in lines:  # Every process raises the same error: none is left waiting.
        assert line.startswith("ERROR workdir") and "processes [1] do not see" in line
    shared = str(tmp_path / "shared" / "run")
    assert _check_in_two_processes([shared, shared]) == [f"OK {shared}"] * 2
    assert os.listdir(shared) == []  # The probe is removed again.
