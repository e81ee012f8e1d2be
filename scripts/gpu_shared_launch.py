#!/usr/bin/env python3
"""`python -m launch` with every local rank on cuda:0: for checking the NCCL pipeline on a machine
with one GPU (scripts/gpu_engine_check.py). Real jobs give each rank its own GPU; the engine
refuses more local ranks than GPUs, which this script lifts for a check only.

    torchrun --nproc-per-node 2 scripts/gpu_shared_launch.py generate MODEL --num_pipeline_ranks 2 ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import launch.runtime  # noqa: E402
from distributed.topology import Topology  # noqa: E402


def first_gpu(topo: Topology, device: str) -> torch.device:
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


launch.runtime.pick_device = first_gpu  # type: ignore[assignment]

from launch.cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
