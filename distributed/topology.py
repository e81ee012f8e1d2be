"""Who am I in the job: rank, world size, local rank and device, from torchrun's or Slurm's env."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from model.args import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"  # single | torchrun | slurm


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list ('node[03-05,7],gpu1' -> 'node03'); scontrol if present."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """torchrun (RANK/WORLD_SIZE/LOCAL_RANK) wins; else srun (SLURM_PROCID/NTASKS/LOCALID); else one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Topology(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        # A port derived from the job id keeps two jobs sharing a node from colliding.
        port = int(env.get("MASTER_PORT", 20000 + job % 10000))
        return Topology(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return Topology()


def single_host(topo: Topology, env: Mapping[str, str] | None = None) -> bool:
    """Whether every rank of the job runs on this one node (torchrun: LOCAL_WORLD_SIZE equals
    WORLD_SIZE; Slurm: one node in the step). Unknown counts as several hosts."""
    env = os.environ if env is None else env
    if topo.world_size == 1:
        return True
    if topo.launcher == "torchrun":
        return env.get("LOCAL_WORLD_SIZE") == str(topo.world_size)
    if topo.launcher == "slurm":
        return (env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")) == "1"
    return False


def pick_device(topo: Topology, device: str) -> torch.device:
    """'auto' -> cuda:<local rank> when CUDA is present, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if topo.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {topo.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        torch.cuda.set_device(topo.local_rank)
        return torch.device("cuda", topo.local_rank)
    if device != "cpu":
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


def init_distributed(topo: Topology, device: torch.device, timeout_s: float) -> None:
    """Create the default process group (gloo on CPU, NCCL on CUDA) with an explicit timeout."""
    if topo.world_size == 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", topo.master_addr)
    os.environ.setdefault("MASTER_PORT", str(topo.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=topo.rank,
        world_size=topo.world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
