"""Stand-in for `python -m launch generate` while the engine is being written.

Takes the rank from torchrun's or Slurm's environment, joins a gloo process group, and builds
each output line from pieces contributed by every rank (all_reduce), so that the file it writes
is identical for any world size only if every rank took part. Used to build and debug the
cluster tests; the tests themselves run the real command once it exists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ:  # srun, one task per rank
        if "MASTER_ADDR" not in os.environ:
            hosts = subprocess.run(
                ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            os.environ["MASTER_ADDR"] = hosts[0]
        os.environ.setdefault("MASTER_PORT", "29500")
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["generate"])
    parser.add_argument("model_dir")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--num_pipeline_ranks", type=int, default=1)
    parser.add_argument("--dist_timeout", type=float, default=60.0)
    parser.add_argument("--sleep", type=float, default=0.0, help="per output line, to test killing")
    args = parser.parse_args()

    rank, world = rank_world()
    if world != args.num_pipeline_ranks:
        sys.exit(f"--num_pipeline_ranks {args.num_pipeline_ranks} but the world size is {world}")
    if world > 1:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.dist_timeout)
        )
    with open(args.input) as f:
        prompts = [json.loads(line) for line in f if line.strip()]
    lines = []
    for p in prompts:
        source = p["tokens"] if "tokens" in p else [ord(c) for c in p["prompt"]]
        n = min(args.max_tokens, len(source))
        mine = torch.zeros(n, dtype=torch.int64)
        mine[rank::world] = torch.tensor([(t * 7 + 3) % 512 for t in source[:n]][rank::world])
        if world > 1:
            dist.all_reduce(mine)
        tokens = mine.tolist()
        lines.append({"tokens": tokens, "text": "".join(chr(97 + t % 26) for t in tokens)})
        time.sleep(args.sleep)
    if rank == 0:
        with open(args.output, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    print(f"rank {rank}/{world} on {os.uname().nodename} done", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
