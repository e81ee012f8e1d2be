"""Which launcher started the job, and whether its ranks share one host (the decode micro-batch
policy of launch/runtime.py depends on it)."""

from __future__ import annotations

import pytest
import torch

from distributed.topology import Topology, detect, single_host
from launch.options import RunOptions
from launch.runtime import Runtime


def test_torchrun_and_slurm_environments_are_read() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29511"}
    assert detect(env) == Topology(1, 4, 1, "n1", 29511, "torchrun")
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7",
             "MASTER_ADDR": "n2"}  # fmt: skip
    assert detect(slurm) == Topology(3, 4, 1, "n2", 20007, "slurm")
    assert detect({}) == Topology()


@pytest.mark.parametrize(
    "launcher,env,want",
    [
        ("torchrun", {"LOCAL_WORLD_SIZE": "2"}, True),
        ("torchrun", {"LOCAL_WORLD_SIZE": "1"}, False),  # two nodes, one rank each
        ("torchrun", {}, False),  # unknown: counted as several hosts
        ("slurm", {"SLURM_STEP_NUM_NODES": "1"}, True),
        ("slurm", {"SLURM_NNODES": "2"}, False),
        ("slurm", {}, False),
    ],
)
def test_single_host(launcher: str, env: dict[str, str], want: bool) -> None:
    assert single_host(Topology(0, 2, 0, launcher=launcher), env) is want
    assert single_host(Topology(), {}) is True


@pytest.mark.parametrize(
    "device,microbatches,one_host,want",
    [("cpu", None, True, 1), ("cpu", 2, True, None), ("cpu", None, False, None), ("cuda", None, True, None)],
)
def test_decode_micro_batches_policy(
    monkeypatch: pytest.MonkeyPatch, device: str, microbatches: int | None, one_host: bool, want: int | None
) -> None:
    """Decode in one micro-batch only where every stage is a CPU process of one host and the user
    did not choose --num_microbatches."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2" if one_host else "1")
    rt = Runtime(Topology(0, 2, 0, launcher="torchrun"), torch.device(device),
                 RunOptions(model_dir="m", num_pipeline_ranks=2, num_microbatches=microbatches))  # fmt: skip
    assert rt.decode_microbatches() == want
    assert rt.generation_params(()).decode_microbatches == want
    one = Runtime(Topology(), torch.device("cpu"), RunOptions(model_dir="m"))
    assert one.decode_microbatches() is None
