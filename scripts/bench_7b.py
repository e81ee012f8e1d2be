"""Scale on one machine: a Mistral-7B-shaped random checkpoint in bf16, P = 1 and P = 2.

    python scripts/bench_7b.py --md docs/benchmarks.md

1. `python -m launch make-checkpoint` writes configs/mistral-7b.json with random bf16 weights
   (~14.5 GB) into a temporary folder under --tmp; it is removed at the end, whatever happens.
2. `launch bench` runs on it (one job at a time, each a fresh process group):
     P=1 batch 1 (all threads, --bandwidth, transformers peer on the same tensors if installed)
     P=2 batch 1 (one rank's threads each, --bandwidth)
     P=1 batch 2 (all threads) and P=2 M=2 batch 2 (naive peer in the same job): equal resources
   Each reports per-rank peak RSS, decode time per token and, with --bandwidth, that time against
   the floor: the bytes a decode step streams / the copy bandwidth measured in the same job.
3. The rolling cache: KV bytes at 32k tokens with the 4096 window against a full cache, from the
   engine's RollingCache on the meta device (no memory needed).
Writes a section between `<!-- bench7b:begin -->` and `<!-- bench7b:end -->` in --md and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling import free_port, wait_for_quiet, write_section  # scripts/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def env_for(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def log(msg: str) -> None:
    print(f"[bench_7b {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_bench(model: Path, p: int, threads: int, batch: int, m: int, a: argparse.Namespace,
              extra: list[str], env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    flags = ["bench", str(model), "--num_pipeline_ranks", str(p), "--num_microbatches", str(m),
             "--batch_size", str(batch), "--prompt_len", str(a.prompt_len), "--new_tokens", str(a.new_tokens),
             "--threads", str(threads), "--repeat", str(a.repeat), "--warmup", str(a.warmup), "--json",
             "--dist_timeout", "1800", *extra]  # fmt: skip
    if p == 1:
        cmd = [sys.executable, "-m", "launch", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p),
               "--master-port", str(free_port()), "-m", "launch", *flags]  # fmt: skip
    log(" ".join(cmd[1:]))
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env_for(threads) | env, stdout=subprocess.PIPE, stderr=None, text=True,
                       timeout=a.timeout)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"bench failed with exit code {r.returncode}")
    rep: dict[str, Any] = json.loads(next(x for x in reversed(r.stdout.splitlines()) if x.startswith("{")))
    rep["wall_s"] = time.monotonic() - t0
    prefix = [f"{k}={v}" for k, v in env.items()]
    rep["command"] = " ".join(prefix + (["torchrun", *cmd[3:]] if p > 1 else ["python", *cmd[1:]]))
    log(f"done in {rep['wall_s']:.0f} s: decode {rep['decode_ms_per_token']:.0f} ms/token/sequence")
    return rep


def rolling_cache_bytes(config: Path, tokens: int) -> dict[str, int]:
    import torch

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from model.args import ModelArgs
    from model.cache import RollingCache, cache_capacity

    args = ModelArgs.from_json(config)
    out = {}
    for name, window in (("rolling", args.sliding_window), ("full", None)):
        cap = cache_capacity(window, tokens)
        cache = RollingCache(range(args.n_layers), 1, cap, window, args.n_kv_heads, args.head_dim, torch.bfloat16,
                             "meta")  # fmt: skip
        out[name] = cache.nbytes
    return out


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    runs: dict[str, dict[str, Any]] = res["runs"]
    any_run = next(iter(runs.values()), None)
    lines = ["### Mistral-7B shape, bf16, random weights", ""]
    if any_run:
        m = any_run["machine"]
        lines += [
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, torch {m['torch']}, "
            f"Python {m['python']}. Checkpoint: {res['checkpoint_bytes'] / GB:.2f} GB written in "
            f"{res['make_checkpoint_s']:.0f} s by `python -m launch make-checkpoint <tmp> --config "
            f"{res['config']} --dtype bfloat16`, removed afterwards. Prompt {res['prompt_len']} tokens, "
            f"{res['new_tokens']} new tokens, median of {res['repeat']} run(s) after {res['warmup']} warm-up.",
            "",
            "| run | P | M | batch | threads/rank | load s | TTFT s | prefill tok/s | decode ms/token | decode tok/s "
            "| floor ms/token | vs floor | peak RSS GB per rank | RSS budget GB | weights GB per rank "
            "| KV MB | utilisation per rank | CPU busy before % | 1-min load after |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            ranks = r["ranks"]

            def per_rank(key: str, ranks: list[dict[str, Any]] = ranks) -> str:
                return " / ".join(f"{x[key] / GB:.2f}" for x in ranks)

            lines.append(
                f"| {name} | {r['num_pipeline_ranks']} | {r['num_microbatches']} | {r['batch_size']} "
                f"| {r['threads_per_rank'][0]} | {max(x['load_s'] for x in ranks):.0f} | {r['ttft_s']:.2f} "
                f"| {r['prefill_tok_s']:.1f} | {_f(r['decode_ms_per_token'], '.0f')} | {_f(r['decode_tok_s'], '.3f')} "
                f"| {_f(r.get('decode_floor_ms_per_token'), '.0f')} | {_f(r.get('decode_vs_floor'), '.2f')} "
                f"| {per_rank('peak_rss_bytes')} | {per_rank('rss_budget_bytes')} | {per_rank('weight_bytes')} "
                f"| {r['kv_bytes'] / 1e6:.1f} | {' / '.join(_f(u, '.2f') for u in r.get('utilization', []))} "
                f"| {_f(r.get('busy_before'), '.0f')} | {_f(r['machine'].get('load_average_1min'))} |"
            )
        lines.append("")
        for name, r in runs.items():
            bws = [x["bandwidth"] for x in r["ranks"] if "bandwidth" in x]
            if bws:
                lines.append(
                    f"- {name}: copy bandwidth per rank "
                    + ", ".join(f"{b['copy_gbs']:.1f} GB/s (read {b['read_gbs']:.1f})" for b in bws)
                    + f"; streamed bytes per decode step {sum(x['streamed_bytes'] for x in r['ranks']) / GB:.2f} GB"
                )
            for peer, p in r["peers"].items():
                v = p["vs_engine"]
                extra = f", tokens agree {p['tokens_agree']:.2f}" if "tokens_agree" in p else ""
                lines.append(
                    f"- {name}: peer {peer}{' ' + p['version'] if 'version' in p else ''}: decode "
                    f"{_f(p['decode_ms_per_token'], '.0f')} ms/token, prefill {p['prefill_tok_s']:.1f} tok/s; "
                    f"peer/engine decode {_f(v['decode_tok_s'], '.2f')}, prefill {_f(v['prefill_tok_s'], '.2f')}"
                    f"{extra}"
                )
        if "P1_b2" in runs and "P2_b2" in runs:
            a, b = runs["P1_b2"]["decode_tok_s"], runs["P2_b2"]["decode_tok_s"]
            lines.append(f"- equal resources, batch 2: P=2 M=2 (1 thread each) / P=1 (2 threads) decode = {b / a:.2f}")
        lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in runs.values()]
    for name, reason in res.get("skipped", {}).items():
        lines.append(f"- {name} skipped: {reason}")
    kv = res["rolling_cache"]
    lines += [
        "",
        f"Rolling cache at {res['cache_tokens']} tokens (batch 1, all {res['n_layers']} layers, bf16): window 4096 -> "
        f"{kv['rolling'] / 2**20:.0f} MiB, full cache -> {kv['full'] / 2**20:.0f} MiB "
        f"({kv['full'] / kv['rolling']:.1f}x), from the engine's RollingCache on the meta device; both include "
        "its one padding slot per sequence.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "mistral-7b.json"))
    ap.add_argument("--tmp", default="/tmp", help="where the temporary checkpoint folder is made")
    ap.add_argument("--model_dir", default=None, help="use this existing checkpoint instead (not removed)")
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", default="P1_b1,P2_b1,P1_b2,P2_b2,P1_b1_passive", help="which runs, comma-separated")
    ap.add_argument("--no_hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--cache_tokens", type=int, default=32768)
    ap.add_argument("--md", default=None, help="markdown file to write the section into")
    ap.add_argument("--json_out", default=None, help="also write the results here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    ap.add_argument("--quiet_cpu", type=float, default=100, help="before each run wait until CPUs are <= this %% busy")
    ap.add_argument("--max_wait", type=float, default=600, help="the longest wait for --quiet_cpu, seconds")
    a = ap.parse_args(argv)

    import importlib.util

    import psutil

    cores = len(os.sched_getaffinity(0))
    res: dict[str, Any] = {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeat": a.repeat,
                           "warmup": a.warmup, "runs": {}, "skipped": {}}  # fmt: skip
    res["rolling_cache"] = rolling_cache_bytes(Path(a.config), a.cache_tokens)
    res["cache_tokens"] = a.cache_tokens
    res["config"] = os.path.relpath(a.config, REPO)
    res["n_layers"] = json.loads(Path(a.config).read_text())["n_layers"]
    tmpdir = None
    try:
        if a.model_dir:
            model = Path(a.model_dir)
            res["make_checkpoint_s"] = 0.0
        else:
            free = shutil.disk_usage(a.tmp).free
            if free < 17 * GB:
                raise SystemExit(f"{a.tmp} has {free / GB:.1f} GB free; the checkpoint needs ~14.5 GB (+ margin)")
            tmpdir = Path(tempfile.mkdtemp(prefix="mistral7b-bench-", dir=a.tmp))
            model = tmpdir / "m"
            log(f"writing a random bf16 checkpoint of {a.config} into {model}")
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "launch", "make-checkpoint", str(model), "--config", a.config,
                            "--dtype", "bfloat16"], cwd=REPO, env=env_for(cores), check=True,
                           timeout=a.timeout)  # fmt: skip
            res["make_checkpoint_s"] = time.monotonic() - t0
            log(f"written in {res['make_checkpoint_s']:.0f} s")
        res["checkpoint_bytes"] = sum(f.stat().st_size for f in model.iterdir())
        weights = res["checkpoint_bytes"]
        hf = not a.no_hf and importlib.util.find_spec("transformers") is not None
        if not a.no_hf and not hf:
            res["skipped"]["transformers"] = "transformers is not installed"
        plan = {
            "P1_b1": (1, cores, 1, 1, ["--bandwidth"] + (["--compare_hf"] if hf else [])),
            "P2_b1": (2, max(1, cores // 2), 1, 1, ["--bandwidth"]),
            "P1_b2": (1, cores, 2, 1, []),
            "P2_b2": (2, max(1, cores // 2), 2, 2, ["--compare_naive"]),
            # the same as P1_b1 with OpenMP threads that sleep instead of spinning when idle
            "P1_b1_passive": (1, cores, 1, 1, ["--compare_hf"] if hf else []),
        }
        env_extra = {"P1_b1_passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
        for name in a.runs.split(","):
            p, threads, batch, m, extra = plan[name]
            need = weights / p + 2 * GB + (0.1 * weights if "--compare_hf" in extra else 0)
            avail = psutil.virtual_memory().available
            if avail < need:
                res["skipped"][name] = f"{avail / GB:.1f} GB available, needs ~{need / GB:.1f} GB per rank"
                log(f"skipping {name}: {res['skipped'][name]}")
                continue
            busy = wait_for_quiet(a.quiet_cpu, a.max_wait) if a.quiet_cpu < 100 else None
            res["runs"][name] = run_bench(model, p, threads, batch, m, a, extra, env_extra.get(name, {}))
            res["runs"][name]["busy_before"] = busy
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            log(f"removed {tmpdir}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))
    if a.md:
        write_section(Path(a.md), "bench7b", markdown(res))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
