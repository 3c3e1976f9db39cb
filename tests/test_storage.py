"""Workdir storage: the path layer (`files`), the start-up checks (`train.storage`) and metric
files, on local paths and on a local stand-in for Google Cloud Storage (tests/fake_gcs.py)."""

import json
import os

import pytest

from nfnets_jax import files, metrics
from nfnets_jax.train import storage


@pytest.fixture(scope="module")
def gcs():
    import fake_gcs

    server, _ = fake_gcs.start()
    return server


def test_urls_are_joined_without_losing_the_scheme_and_bad_schemes_are_named():
    assert files.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
    assert files.absolute("gs://b/run") == "gs://b/run"
    with pytest.raises(ValueError, match=r"workdir 's3://b/x': the URL scheme s3:// is not"):
        files.check_path("s3://b/x", "workdir")
    with pytest.raises(ValueError, match="names no bucket"):
        files.check_path("gs:///x", "workdir")


def test_check_workdir_leaves_no_probe_and_names_an_unwritable_workdir(tmp_path):
    workdir = str(tmp_path / "run")
    assert storage.check_workdir(workdir) == workdir
    assert os.listdir(workdir) == []
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(storage.WorkdirError, match=f"Cannot write to workdir {blocker}/run"):
        storage.check_workdir(str(blocker / "run"))


def test_check_regions_refuses_a_bucket_in_another_region():
    regions = {"eu-data": ("europe-west4", ["europe-west4"]), "us-data": ("us", ["us"])}
    paths = {"workdir": "gs://us-data/run", "config.data_dir": "gs://eu-data/tfds"}
    with pytest.raises(ValueError, match=r"VM is in us-central2, but config.data_dir gs://eu-data"):
        storage.check_regions(paths, lambda: "us-central2", regions.get)
    storage.check_regions({"workdir": "gs://us-data/run"}, lambda: "us-central2", regions.get)
    storage.check_regions(paths, lambda: None, regions.get)  # Off Google Cloud: no check.


def test_gcs_files_round_trip_rename_and_missing_bucket(gcs):
    run = "gs://nfnets-test/files"
    files.write_json(files.join(run, "a", "config.json"), {"x": 1})
    assert files.read_json(files.join(run, "a", "config.json")) == {"x": 1}
    assert files.read_json(files.join(run, "none.json")) is None
    files.rename(files.join(run, "a"), files.join(run, "b"))
    assert files.listdir(run) == ["b"]
    assert json.loads(files.read_text(files.join(run, "b", "config.json"))) == {"x": 1}
    with pytest.raises(storage.WorkdirError, match="gs://no-such-bucket/run.*Bucket does not"):
        storage.check_workdir("gs://no-such-bucket/run")
    assert storage.check_workdir(files.join(run, "w")) == files.join(run, "w")
    assert files.listdir(run) == ["b"]  # The probe is gone (a bucket has no empty folders).


def test_gcs_metrics_survive_a_restart_of_the_writer(gcs):
    run = "gs://nfnets-test/metrics"
    writer = metrics.MetricWriter(run, enabled=True, upload_every_s=3600)
    writer.write(1, "train", {"loss": 1.0})
    writer.flush()
    writer.write(2, "train", {"loss": 0.5})
    writer.close()
    writer = metrics.MetricWriter(run, enabled=True)  # A resumed run keeps the history.
    writer.write(3, "eval", {"top1": 0.25})
    writer.close()
    got = metrics.read_metrics(run)
    assert [r["step"] for r in got["train"]] == [1, 2] and got["eval"] == [
        {"step": 3, "top1": 0.25}
    ]
    assert any(n.startswith("events.out") for n in files.listdir(files.join(run, "tensorboard")))
