"""Run by the multi-process tests under torchrun or as plain Slurm-style processes.

Every rank loads its stage through the real launch path (Runtime); rank 0 runs a matrix of
micro-batch counts and chunk sizes in one process group and writes the tokens as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.pipeline import GenerationParams  # noqa: E402
from launch.cli import run_guarded  # noqa: E402
from launch.options import RunOptions  # noqa: E402
from launch.runtime import Runtime  # noqa: E402
from model.args import ConfigError  # noqa: E402
from model.formats import open_source  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token lists")
    ap.add_argument("--max_tokens", type=int, default=20)
    ap.add_argument("--microbatches", default="1,2,4")
    ap.add_argument("--chunks", default="0,1,3")  # 0: the default chunk size
    ap.add_argument("--layer_split", default=None)
    ap.add_argument("--forever", action="store_true", help="generate until killed (fault tests)")
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    opts = RunOptions(model_dir=a.model_dir, num_pipeline_ranks=world, layer_split=a.layer_split,
                      dist_timeout=a.timeout, threads=1)
    rt = Runtime.start(opts)
    Path(a.out).with_suffix(f".pid{rt.rank}").write_text(str(os.getpid()))
    error = None
    try:
        pipe = rt.load(open_source(a.model_dir))
    except ConfigError as e:
        error = str(e)
    rt.agree(error)
    if rt.rank != 0:
        pipe.serve()
        rt.close()
        return
    prompts = json.loads(a.prompts)
    if a.forever:
        print("GENERATING", flush=True)
        pipe.generate(prompts, GenerationParams(max_tokens=10**7, eos_ids=()))
    results = {}
    for m in [int(x) for x in a.microbatches.split(",")]:
        for c in [int(x) for x in a.chunks.split(",")]:
            p = GenerationParams(max_tokens=a.max_tokens, eos_ids=(), num_microbatches=m, chunk_size=c or None)
            results[f"greedy m={m} c={c}"] = pipe.generate(prompts, p)
        s = GenerationParams(max_tokens=a.max_tokens, eos_ids=(), num_microbatches=m,
                             sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7))
        results[f"sampled m={m}"] = pipe.generate(prompts, s)
        if m > 1:  # prefill in m micro-batches, decode in one (the default on one CPU host)
            p = GenerationParams(max_tokens=a.max_tokens, eos_ids=(), num_microbatches=m, decode_microbatches=1)
            results[f"greedy m={m} decode=1"] = pipe.generate(prompts, p)
            results[f"sampled m={m} decode=1"] = pipe.generate(prompts, replace(s, decode_microbatches=1))
    pipe.shutdown()
    rt.close()
    Path(a.out).write_text(json.dumps(results))


if __name__ == "__main__":
    run_guarded(main)
