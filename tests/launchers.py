"""Start a multi-process job for tests: under torchrun, or as plain Slurm-style processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torchrun(nproc: int, args: list[str], **kw: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # type: ignore[call-overload]


def slurm_style(nproc: int, args_per_rank: list[list[str]]) -> list[subprocess.Popen[str]]:
    """Ranks as plain processes with only Slurm's variables, the way `srun python ...` starts them."""
    port = str(free_port())
    procs = []
    for r in range(nproc):
        env = base_env() | {"SLURM_PROCID": str(r), "SLURM_NTASKS": str(nproc), "SLURM_LOCALID": str(r),
                            "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *args_per_rank[r]], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs
