"""Start-up checks of where a run writes and reads, before any step runs or any record is written.

`check_workdir`: the workdir is a local path or a supported URL (`files.SUPPORTED_SCHEMES`);
process 0 can write it (a probe file, removed again); and, in a multi-process run, every
process sees what process 0 wrote, i.e. the workdir is one shared store (a gs:// bucket or a
shared file system), not a local disk per host. Every process takes part and every process
raises the same error, so none is left waiting for the others.

`check_regions`: on a Google Cloud VM, the buckets of the workdir and the data_dir are in
(or span) the VM's region; reading ImageNet across regions is slow and billed as egress.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Callable

import jax
from absl import logging

from nfnets_jax import files, parallel

PROBE_PREFIX = ".nfnets_probe-"
# How long other processes look for process 0's probe (shared file systems may lag).
SHARED_WAIT_S = 10.0
_METADATA_ZONE = "http://{host}/computeMetadata/v1/instance/zone"
# Multi-region bucket locations and the prefix of the regions they span.
_MULTI_REGIONS = {"us": "us-", "eu": "europe-", "asia": "asia-"}


class WorkdirError(OSError):
    """The workdir cannot be used: not writable, or not shared between the processes."""


def _write_probe(path: str, token: int) -> str | None:
    """Writes the probe; None on success, else why it failed."""
    try:
        files.write_text(path, json.dumps({"token": token}))
        return None
    except Exception as e:  # Any store's error (OSError, tf.errors, google.api_core...).
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _sees_probe(path: str, token: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if json.loads(files.read_text(path)).get("token") == token:
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def check_workdir(workdir: str, wait_s: float = SHARED_WAIT_S) -> str:
    """Checks that the run can write `workdir` and that all its processes share it.

    Leaves nothing behind but the workdir directory itself (local paths).

    Args:
      workdir: a local path or a gs:// URL.
      wait_s: how long the other processes look for process 0's probe.

    Returns:
      The workdir (local paths made absolute, ``~`` expanded).

    Raises:
      ValueError: the URL scheme is not supported (naming the supported ones).
      WorkdirError: process 0 cannot write it, or another process does not see its probe.
    """
    workdir = files.absolute(files.check_path(workdir, "workdir"))
    first = jax.process_index() == 0
    token = uuid.uuid4().int & (2**31 - 1)  # Broadcast as int32 (jax without x64).
    probe = None
    failure = None
    if first:  # Process 0 draws the token: the probe's name and content.
        probe = files.join(workdir, f"{PROBE_PREFIX}{token:x}")
        try:
            files.makedirs(workdir)
        except Exception as e:  # Reported below, with the same words as a failed write.
            failure = f"{type(e).__name__}: {e}"
        failure = failure or _write_probe(probe, token)
    if jax.process_count() > 1:
        token, failed = parallel.broadcast_ints([token, int(failure is not None)])
        probe = files.join(workdir, f"{PROBE_PREFIX}{token:x}")
        sees = first or failed or _sees_probe(probe, token, wait_s)
        seen = parallel.process_allgather_ints([int(sees)])[:, 0]
        blind = [i for i, ok in enumerate(seen) if not ok]
        failure = failure or ("failed (see the log of process 0)" if failed else None)
    else:
        blind = []
    if first and failure is None:
        try:
            files.remove(probe)
        except OSError as e:
            logging.warning("Could not remove the workdir probe %s: %s", probe, e)
    if failure is not None:
        raise WorkdirError(
            f"Cannot write to workdir {workdir}: writing a probe file {failure}. Check that it "
            "(and, for gs://, the bucket) exists and that this machine may write to it "
            "(gcloud storage ls / a service account with storage write access)."
        )
    if blind:
        raise WorkdirError(
            f"workdir {workdir} is not shared between the processes: processes {blind} do "
            f"not see the file process 0 wrote there within {wait_s:g} s. Every process must "
            "write to the same store: use a gs:// bucket or a file system mounted on every "
            "host (a local disk per host would split the checkpoints)."
        )
    return workdir


def vm_region(timeout_s: float = 1.0) -> str | None:
    """This Google Cloud VM's region (from the metadata server, GCE_METADATA_HOST as in
    google-auth), None elsewhere."""
    host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    url = _METADATA_ZONE.format(host=host)
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            zone = response.read().decode().rsplit("/", 1)[-1]  # projects/N/zones/us-east1-d
    except (OSError, ValueError):
        return None
    return zone.rsplit("-", 1)[0] if zone.count("-") >= 2 else None


def bucket_regions(bucket: str) -> tuple[str, list[str]]:
    """(location, regions it holds data in) of a GCS bucket; multi-regions as 'us', 'eu'..."""
    from google.cloud import storage  # The "gcs" extra; orbax needs it on gs:// too.

    resource = storage.Client().get_bucket(bucket)
    location = (resource.location or "").lower()
    regions = [r.lower() for r in (getattr(resource, "data_locations", None) or [])]
    return location, regions or [location]


def _in_region(regions: list[str], region: str) -> bool:
    return any(r == region or region.startswith(_MULTI_REGIONS.get(r, "\0")) for r in regions)


def check_regions(
    paths: dict[str, str | None],
    region_of_vm: Callable[[], str | None] = vm_region,
    regions_of_bucket: Callable[[str], tuple[str, list[str]]] = bucket_regions,
) -> None:
    """Raises if a gs:// path lies in a bucket outside this VM's region.

    Does nothing off Google Cloud (no metadata server) or when no path is a gs:// URL.

    Args:
      paths: {what: path}, e.g. {"workdir": ..., "config.data_dir": ...}.
      region_of_vm: returns the VM's region or None.
      regions_of_bucket: returns (location, regions) of a bucket.

    Raises:
      ValueError: naming each path, its bucket's location and the VM's region.
    """
    urls = {k: v for k, v in paths.items() if v and str(v).startswith("gs://")}
    region = region_of_vm() if urls else None
    if region is None:
        return
    far = []
    for what, url in urls.items():
        bucket = url[len("gs://") :].split("/", 1)[0]
        try:
            location, regions = regions_of_bucket(bucket)
        except Exception as e:  # No client library, no permission: do not block the run.
            logging.warning("Cannot read the location of bucket %s (%s).", bucket, e)
            continue
        if not _in_region(regions, region):
            far.append(f"{what} {url} (bucket location {location})")
    if far:
        raise ValueError(
            f"This VM is in {region}, but {'; '.join(far)} is elsewhere: every read is slow "
            "and billed as cross-region egress. Copy the data to a bucket in the VM's region, "
            "or pass --allow_cross_region to go on."
        )
