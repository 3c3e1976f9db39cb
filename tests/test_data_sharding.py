"""Index arithmetic of the input pipeline: host shards, eval padding, resume positions."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfnets_jax.data import sharding


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 5000), process_count=st.integers(1, 16))
def test_host_shards_are_disjoint_and_cover_split(n, process_count):
    seen = []
    for p in range(process_count):
        seen.extend(sharding.host_indices(n, p, process_count).tolist())
    assert sorted(seen) == list(range(n))
    sizes = [len(sharding.host_indices(n, p, process_count)) for p in range(process_count)]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), process_count=st.integers(1, 16), per_host=st.integers(1, 300))
def test_eval_batches_hold_every_host_shard(n, process_count, per_host):
    num_batches = sharding.eval_num_batches(n, process_count, per_host)
    sizes = [len(sharding.host_indices(n, p, process_count)) for p in range(process_count)]
    assert num_batches * per_host >= max(sizes)
    assert (num_batches - 1) * per_host < max(sizes)


@pytest.mark.parametrize("global_batch,processes,devices", [(10, 1, 8), (12, 2, 4), (0, 1, 1)])
def test_batch_layout_rejects_indivisible_batches(global_batch, processes, devices):
    with pytest.raises(ValueError, match="must be a positive multiple of process_count"):
        sharding.batch_layout(global_batch, processes, devices)


def test_batch_layout_splits_batch():
    layout = sharding.batch_layout(4096, 4, 8)
    assert (layout.per_device_batch, layout.per_host_batch) == (128, 1024)


@settings(max_examples=200, deadline=None)
@given(step=st.integers(0, 10**6), per_step=st.integers(1, 4096), epoch=st.integers(1, 10**6))
def test_resume_position_inverts_stream_position(step, per_step, epoch):
    e, offset = sharding.resume_position(step, per_step, epoch)
    assert 0 <= offset < epoch
    assert e * epoch + offset == step * per_step
    assert e == math.floor(step * per_step / epoch)


def test_resume_position_rejects_empty_shard():
    with pytest.raises(ValueError, match="shard of the training split is empty"):
        sharding.resume_position(3, 8, 0)
