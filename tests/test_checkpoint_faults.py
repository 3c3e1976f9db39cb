"""Damaged checkpoints: fallback to the newest readable step, clear errors, unsafe files.

One tiny training run (checkpoints at steps 2 and 4) is shared by the module; each damage
case works on a copy of its workdir. The files damaged are the ones orbax 0.12 writes:
`<step>/default/_METADATA` (the tree, JSON) and the array data under
`<step>/default/ocdbt.process_0/d/` (the largest file of a step).
"""

import logging
import os
import pickle
import shutil

import jax
import numpy as np
import pytest
from tiny_run import assert_trees_equal, tiny_config

from nfnets_jax import train
from nfnets_jax.checkpoints import errors, loading, released
from nfnets_jax.checkpoints import workdir as workdir_ckpt

pytestmark = pytest.mark.xdist_group("trainer")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    results = train.train_and_evaluate(tiny_config(), workdir)
    assert workdir_ckpt.Checkpointer(workdir).all_steps() == [2, 4]
    return workdir, results


def step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step))


def data_file(workdir, step):
    """The largest array data file of a step."""
    paths = [
        os.path.join(root, name)
        for root, _, names in os.walk(step_dir(workdir, step))
        for name in names
    ]
    return max((p for p in paths if f"{os.sep}d{os.sep}" in p), key=os.path.getsize)


def truncate_data(workdir, step):
    path = data_file(workdir, step)
    os.truncate(path, os.path.getsize(path) // 2)


def empty_metadata(workdir, step):
    open(os.path.join(step_dir(workdir, step), "default", "_METADATA"), "w").close()


def delete_metadata(workdir, step):
    os.remove(os.path.join(step_dir(workdir, step), "default", "_METADATA"))


DAMAGES = {"truncated_data": truncate_data, "empty_metadata": empty_metadata}
DAMAGES["deleted_metadata"] = delete_metadata


def damaged_copy(trained, tmp_path, damage, steps=(4,)):
    workdir = str(tmp_path / "workdir")
    shutil.copytree(trained[0], workdir)
    for step in steps:
        DAMAGES[damage](workdir, step)
    return workdir


def files_of(directory):
    return {
        os.path.relpath(os.path.join(root, name), directory): open(
            os.path.join(root, name), "rb"
        ).read()
        for root, _, names in os.walk(directory)
        for name in names
    }


def skip_lines(caplog, workdir, step):
    path = step_dir(workdir, step)
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and f"step {step} ({path})" in r.getMessage()
    ]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_skips_a_damaged_newest_step_and_trains_to_the_same_end(
    trained, tmp_path, caplog, damage
):
    workdir = damaged_copy(trained, tmp_path, damage)
    damaged_files = files_of(step_dir(workdir, 4))
    good_files = files_of(step_dir(workdir, 2))
    # Saving every step: step 3 is saved below the damaged newest step 4, then step 4 again.
    with caplog.at_level(logging.INFO):
        resumed = train.train_and_evaluate(tiny_config(checkpoint_every_steps=1), workdir)
    assert resumed["step"] == 4
    assert_trees_equal(resumed["state"], trained[1]["state"])  # Same as the uninterrupted run.
    (skipped,) = skip_lines(caplog, workdir, 4)
    assert "Skipping unreadable checkpoint" in skipped and "failed with" in skipped
    assert "\n" not in skipped
    assert "Resuming from step 2" in caplog.text and "skipped the unreadable" in caplog.text
    # The older good checkpoint survives untouched; the damaged one is kept aside, intact.
    assert workdir_ckpt.Checkpointer(workdir).all_steps() == [2, 3, 4]
    assert files_of(step_dir(workdir, 2)) == good_files
    assert files_of(step_dir(workdir, 4) + ".unreadable") == damaged_files
    assert "moved unreadable checkpoint step 4" in caplog.text.lower()
    # And the new step 4 is a good checkpoint.
    params = workdir_ckpt.load_params(workdir)
    assert_trees_equal(params, trained[1]["state"].ema_params)


def test_load_params_falls_back_and_an_explicit_damaged_step_raises(trained, tmp_path, caplog):
    workdir = damaged_copy(trained, tmp_path, "truncated_data")
    before = files_of(os.path.join(workdir, "checkpoints"))
    want = workdir_ckpt.load_params(trained[0], step=2)
    with caplog.at_level(logging.WARNING):
        assert_trees_equal(workdir_ckpt.load_params(workdir), want)
        assert_trees_equal(loading.load_params(workdir, progress=None), want)
    assert len(skip_lines(caplog, workdir, 4)) == 2
    assert "OUT_OF_RANGE" in caplog.text
    with pytest.raises(errors.CheckpointReadError, match="OUT_OF_RANGE") as info:
        workdir_ckpt.load_params(workdir, step=4)
    assert f"step 4 ({step_dir(workdir, 4)}) cannot be read" in str(info.value)
    assert info.value.failures.keys() == {4}
    with pytest.raises(errors.CheckpointReadError, match=r"step 7 .*available steps: \[2, 4\]"):
        workdir_ckpt.load_params(workdir, step=7)
    template = trained[1]["state"]._asdict()
    with pytest.raises(errors.CheckpointReadError, match="cannot be read"):
        workdir_ckpt.Checkpointer(workdir).restore(template, step=4)
    assert files_of(os.path.join(workdir, "checkpoints")) == before  # Reading changes nothing.


def test_every_step_damaged_raises_one_error_listing_them(trained, tmp_path):
    workdir = damaged_copy(trained, tmp_path, "empty_metadata", steps=(4,))
    truncate_data(workdir, 2)
    template = trained[1]["state"]._asdict()
    with pytest.raises(errors.CheckpointReadError) as info:
        workdir_ckpt.Checkpointer(workdir).restore(template)
    message = str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    assert "No readable checkpoint in" in message
    assert (
        f"step 4 ({step_dir(workdir, 4)}): reading its metadata failed with JSONDecode" in message
    )
    assert f"step 2 ({step_dir(workdir, 2)}): reading its arrays failed with ValueError" in message
    assert list(info.value.failures) == [4, 2]
    with pytest.raises(errors.CheckpointReadError, match="No readable checkpoint"):
        workdir_ckpt.load_params(workdir)
    # The trainer stops with the same error and writes nothing.
    record = open(os.path.join(workdir, "config.json"), "rb").read()
    with pytest.raises(errors.CheckpointReadError, match="step 4 .*\n.*step 2"):
        train.train_and_evaluate(tiny_config(), workdir)
    assert open(os.path.join(workdir, "config.json"), "rb").read() == record
    assert workdir_ckpt.Checkpointer(workdir).all_steps() == [2, 4]


def test_a_model_mismatch_is_a_config_error_not_damage(trained, tmp_path):
    # The newest step is damaged (skipped); the older one is readable but of another model.
    workdir = damaged_copy(trained, tmp_path, "deleted_metadata")
    state = trained[1]["state"]._asdict()
    wider = jax.tree.map(np.asarray, state)
    wider["params"]["NFNet/~/linear"]["w"] = np.zeros((64, 20), np.float32)
    checkpointer = workdir_ckpt.Checkpointer(workdir)
    with pytest.raises(ValueError, match="does not fit the model being trained") as info:
        checkpointer.restore(wider)
    assert not isinstance(info.value, errors.CheckpointReadError)
    assert "['params']['NFNet/~/linear']['w']: (64, 10) saved, (64, 20) expected" in str(info.value)
    fewer = dict(state, ema_params=dict(state["ema_params"]))
    del fewer["ema_params"]["NFNet/~/linear"]
    with pytest.raises(ValueError, match=r"2 saved arrays are not in the model") as info:
        checkpointer.restore(fewer)
    assert not isinstance(info.value, errors.CheckpointReadError)


def test_save_after_fallback_keeps_good_checkpoints_and_the_damaged_files(tmp_path, caplog):
    checkpointer = workdir_ckpt.Checkpointer(str(tmp_path), keep=2)
    for step in (2, 4):
        checkpointer.save(step, {"w": np.full((3,), step, np.float32)})
    empty_metadata(str(tmp_path), 4)
    damaged = files_of(step_dir(str(tmp_path), 4))
    checkpointer = workdir_ckpt.Checkpointer(str(tmp_path), keep=2)
    restored = checkpointer.restore({"w": np.zeros((3,), np.float32)})
    np.testing.assert_array_equal(restored["w"], [2, 2, 2])
    assert list(checkpointer.unreadable) == [4]
    # Orbax alone would drop step 2 here (keeping 3 and the damaged 4), then refuse step 4.
    with caplog.at_level(logging.WARNING):
        checkpointer.save(3, {"w": np.full((3,), 3, np.float32)})
    assert checkpointer.all_steps() == [2, 3]
    checkpointer.save(4, {"w": np.full((3,), 4, np.float32)})
    assert checkpointer.all_steps() == [3, 4]
    checkpointer.close()
    assert files_of(step_dir(str(tmp_path), 4) + ".unreadable") == damaged
    assert "Moved unreadable checkpoint step 4" in caplog.text
    reopened = workdir_ckpt.Checkpointer(str(tmp_path), keep=2)
    np.testing.assert_array_equal(reopened.restore({"w": np.zeros(3, np.float32)})["w"], [4] * 3)


def test_stale_tmp_directories_are_removed_on_open(tmp_path, caplog):
    checkpointer = workdir_ckpt.Checkpointer(str(tmp_path))
    checkpointer.save(1, {"w": np.zeros((2,), np.float32)})
    checkpointer.close()
    # What a run killed while saving step 2 leaves (orbax 0.12: `<step>.orbax-checkpoint-tmp`,
    # the item inside `default.orbax-checkpoint-tmp`; older orbax appended -<timestamp>).
    stale = ["2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000"]
    for name in stale:
        partial = os.path.join(checkpointer.directory, name, "default.orbax-checkpoint-tmp")
        os.makedirs(partial)
        open(os.path.join(partial, "_METADATA"), "w").write("{")
    with caplog.at_level(logging.WARNING):
        reopened = workdir_ckpt.Checkpointer(str(tmp_path))
    assert sorted(os.listdir(reopened.directory)) == ["1"]
    for name in stale:
        assert f"Removing {os.path.join(reopened.directory, name)}: a partial" in caplog.text
    assert reopened.all_steps() == [1]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_torch_file_is_refused_as_unsafe(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "code_ran"
    path = str(tmp_path / "evil.pth")
    torch.save({"stem.conv.weight": torch.zeros(2), "x": _RunsCode(marker)}, path)
    with pytest.raises(errors.UnsafeCheckpointError) as info:
        loading.load_params(path, progress=None)
    message = str(info.value)
    assert path in message and "GLOBAL posix.system" in message
    assert "weights_only" not in message and "safe_globals" not in message
    assert info.value.__suppress_context__ and info.value.__cause__ is None
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_truncated_npz_is_reported_as_damaged(tmp_path):
    path = released.save_npz({"m": {"w": np.ones((64, 64), np.float32)}}, str(tmp_path / "w"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert loading.sniff_format(path) == "damaged"
    with pytest.raises(errors.CheckpointFormatError, match="damaged or truncated") as info:
        loading.load_params(path, progress=None)
    assert path in str(info.value) and "not a known checkpoint format" not in str(info.value)


def test_agc_state_of_earlier_checkpoints_restores(tmp_path):
    # Checkpoints written before AdaptiveGradClipState gained its static `num_units` held a
    # NamedTuple with the same three leaves: they must restore into today's state.
    import typing

    import optax

    from nfnets_jax import agc

    class EarlierState(typing.NamedTuple):
        clipped_fraction: np.ndarray
        num_clipped: np.ndarray
        per_param_clipped_fraction: dict

    params = {"w": np.ones((3, 2), np.float32)}
    tx = optax.chain(agc.adaptive_grad_clip(0.01), optax.sgd(0.1, momentum=0.9))
    template = {"opt_state": jax.device_get(tx.init(params)), "step": np.int32(0)}
    earlier = (EarlierState(np.float32(0.5), np.int32(1), {}), template["opt_state"][1])
    checkpointer = workdir_ckpt.Checkpointer(str(tmp_path))
    checkpointer.save(1, {"opt_state": earlier, "step": np.int32(1)})
    restored = checkpointer.restore(template)
    state = agc.find_state(restored["opt_state"])
    assert float(state.clipped_fraction) == 0.5 and int(state.num_clipped) == 1
    assert state.num_units == 2  # From today's transform: 2 output units of w.
    checkpointer.close()
