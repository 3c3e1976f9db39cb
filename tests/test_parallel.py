"""parallel.initialize_distributed: which environments start jax.distributed.

A Slurm allocation (`sbatch` script, `salloc` shell) sets SLURM_NTASKS for the whole job, but
a plain `python ...` there is one process; only `srun` steps with several tasks (and
`mpirun`, and TPU pod workers) are multi-process.
"""

import jax
import pytest

from nfnets_jax import parallel

CLUSTER_VARIABLES = (
    "TPU_WORKER_HOSTNAMES",
    "OMPI_COMM_WORLD_SIZE",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NODELIST",
    "SLURM_STEP_NUM_TASKS",
)
SLURM_ALLOCATION = dict(
    SLURM_JOB_ID="1234", SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_JOB_NODELIST="node[001-002]"
)
SRUN_STEP = dict(
    SLURM_ALLOCATION,
    SLURM_STEP_NUM_TASKS="4",
    SLURM_LOCALID="0",
    SLURM_STEP_NODELIST="node[001-002]",
)


@pytest.fixture
def starts(monkeypatch):
    """Clears cluster variables; records jax.distributed.initialize calls instead of running."""
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    return calls


@pytest.mark.parametrize(
    "env",
    [
        {},
        SLURM_ALLOCATION,
        dict(SRUN_STEP, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1"),
        {"SLURM_STEP_NUM_TASKS": ""},
        {"OMPI_COMM_WORLD_SIZE": "1"},
    ],
)
def test_single_process_environments_do_not_start_distributed(env, starts, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parallel.initialize_distributed()
    assert starts == []


@pytest.mark.parametrize(
    "env",
    [
        SRUN_STEP,
        {"OMPI_COMM_WORLD_SIZE": "2"},
        {"TPU_WORKER_HOSTNAMES": "h0,h1"},
    ],
)
def test_multi_process_environments_start_distributed(env, starts, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parallel.initialize_distributed()
    assert starts == [((), {})]


def test_explicit_layout_and_auto(starts, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "8")
    parallel.initialize_distributed("10.0.0.1:1234", 2, 1)
    parallel.initialize_distributed(auto=True)
    assert starts == [(("10.0.0.1:1234",), {"num_processes": 2, "process_id": 1}), ((), {})]
    with pytest.raises(ValueError, match="needs all of coordinator_address"):
        parallel.initialize_distributed("10.0.0.1:1234")
