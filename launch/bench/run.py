"""The bench run: warm-ups, measured runs (engine and peers interleaved), the report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distributed.pipeline import DEFAULT_CHUNK_NO_WINDOW, GenerationParams
from launch.bench.hf_peer import hf_model_from, time_hf
from launch.bench.measure import (
    GB,
    Progress,
    StageRecorder,
    Timing,
    current_rss,
    huge_page_bytes,
    make_prompts,
    measure_bandwidth,
    median_timing,
    peak_rss,
    time_engine,
)
from launch.bench.options import BenchOptions, check_options
from launch.bench.report import print_report
from launch.bench.stage import build_pipeline
from launch.runtime import Runtime
from model.args import ConfigError
from model.checkpoint import DTYPES
from model.cpu_kernels import linear_kernels
from model.quant import weight_bytes
from model.sampling import SamplingParams

RSS_SLACK_BYTES = 0.5e9  # the memory goal: peak RSS <= 1.15 x weights + cache + 0.5 GB
RSS_WEIGHT_FACTOR = 1.15


def machine_info(device: torch.device) -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": int(psutil.virtual_memory().total),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(opts: BenchOptions) -> None:
    check_options(opts)
    opts.max_tokens = opts.new_tokens
    rt = Runtime.start(opts)
    try:
        _bench(rt, opts)
    finally:
        rt.close()


def _bench(rt: Runtime, opts: BenchOptions) -> None:
    rank, world = rt.rank, rt.n_stages
    base_rss = current_rss()
    error, pipeline, source = None, None, ""
    t_load = time.perf_counter()
    try:
        pipeline, source = build_pipeline(rt, opts)
    except ConfigError as e:
        error = str(e)
    load_s = time.perf_counter() - t_load
    rt.agree(error)
    assert pipeline is not None
    model = pipeline.stage.model
    args = model.args
    loaded_rss = current_rss()
    recorder = StageRecorder(pipeline)

    progress = Progress(not opts.quiet and rank == 0)
    sampling = SamplingParams(opts.temperature, opts.top_p, opts.seed)
    params = GenerationParams(
        max_tokens=opts.new_tokens,
        sampling=sampling,
        chunk_size=opts.chunk_size,
        num_microbatches=opts.num_microbatches,
        decode_microbatches=rt.decode_microbatches(),
        eos_ids=(),
    )
    naive = replace(params, chunk_size=opts.prompt_len, num_microbatches=1)
    result: dict[str, Any] = {}
    tokens: list[list[int]] = []
    prompts = make_prompts(opts.batch_size, opts.prompt_len, args.vocab_size)
    if rank == 0:
        try:
            schedules = [("engine", params)] + ([("naive", naive)] if opts.compare_naive else [])
            for name, p in schedules:
                # Compiled steps compile once per shape: warm up on the measured shapes.
                warm = p if opts.compile else replace(p, max_tokens=min(2, opts.new_tokens))
                for i in range(opts.warmup):
                    time_engine(pipeline, prompts, warm, progress, f"{name} warm-up {i + 1}/{opts.warmup}")
            runs: dict[str, list[Timing]] = {name: [] for name, _ in schedules}
            for i in range(opts.repeat):  # interleaved, so that a change in machine load hits both alike
                for name, p in schedules:
                    t, out = time_engine(pipeline, prompts, p, progress, f"{name} run {i + 1}/{opts.repeat}")
                    runs[name].append(t)
                    if name == "engine":
                        tokens = out
            result = {name: asdict(median_timing(r, opts.batch_size, opts.prompt_len)) for name, r in runs.items()}
        finally:
            pipeline.shutdown()
    else:
        pipeline.serve()

    rss_high = peak_rss()  # before the bandwidth buffers, which are not the engine's
    huge_pages = huge_page_bytes()
    gpu_high = torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else None
    bw: dict[str, float] | None = None
    if opts.bandwidth:  # one rank at a time, so that each sees the memory system to itself
        for r in range(world):
            if r == rank:
                progress(f"measuring memory bandwidth on rank {rank}", force=True)
                bw = measure_bandwidth(opts.bandwidth_mb * 1_000_000, rt.device)
            if rt.control is not None:
                dist.barrier(group=rt.control)
    mine: dict[str, Any] = {
        "rank": rank,
        "layers": [model.layer_ids[0], model.layer_ids[-1]],
        "n_layers": len(model.layer_ids),
        "threads": torch.get_num_threads(),
        "weight_bytes": weight_bytes(model),  # parameters + quantized linears' buffers
        "streamed_bytes": weight_bytes(model) - sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if n == "tok_embeddings.weight"
        ),
        "kv_bytes": recorder.kv_bytes,
        "requests": recorder.requests,
        "load_s": load_s,
        "compile_s": model.compile_seconds,  # one-time torch.compile cost (--compile), in the warm-ups
        "cpu_linears": linear_kernels(model),  # bf16 CPU linears per kernel (--cpu_linear)
        "base_rss_bytes": base_rss,
        "loaded_rss_bytes": loaded_rss,
        "peak_rss_bytes": rss_high,
        "huge_page_bytes": huge_pages,
        "gpu_peak_bytes": gpu_high,
    }
    if bw is not None:
        mine["bandwidth"] = bw
    ranks: list[Any] = [mine]
    if rt.control is not None:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine, group=rt.control)
    if rank != 0:
        return

    names = ["engine"] + (["naive"] if opts.compare_naive else [])
    for rk in ranks:  # requests in order: warm-ups (per schedule), then the measured runs interleaved
        reqs = rk.pop("requests")
        for j, name in enumerate(names):
            idx = [len(names) * opts.warmup + i * len(names) + j for i in range(opts.repeat)]
            util = [reqs[k][0] / reqs[k][1] for k in idx if k < len(reqs) and reqs[k][1] > 0]
            rk.setdefault("utilization", {})[name] = statistics.median(util) if util else None
    for name in names:
        result[name]["utilization"] = [rk["utilization"][name] for rk in ranks]
    dtype = next(model.parameters()).dtype
    engine = result["engine"]
    report: dict[str, Any] = {
        "model": source,
        "model_args": args.to_dict(),
        "batch_size": opts.batch_size,
        "prompt_len": opts.prompt_len,
        "new_tokens": opts.new_tokens,
        "num_pipeline_ranks": world,
        "num_microbatches": min(opts.num_microbatches or world, opts.batch_size),
        "decode_microbatches": min(params.decode_microbatches or opts.num_microbatches or world, opts.batch_size),
        "chunk_size": opts.chunk_size or args.sliding_window or DEFAULT_CHUNK_NO_WINDOW,
        "dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "device": rt.device.type,
        "threads_per_rank": [r["threads"] for r in ranks],
        "warmup": opts.warmup,
        "repeat": opts.repeat,
        **engine,
        "ranks": ranks,
        "kv_bytes": sum(r["kv_bytes"] for r in ranks),
        "weight_bytes": sum(r["weight_bytes"] for r in ranks),
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
    }
    for r in ranks:
        r["rss_budget_bytes"] = int(RSS_WEIGHT_FACTOR * r["weight_bytes"] + r["kv_bytes"] + RSS_SLACK_BYTES)
        r["rss_within_budget"] = r["peak_rss_bytes"] <= r["rss_budget_bytes"]
    if opts.bandwidth:
        floor_s = sum(r["streamed_bytes"] / (r["bandwidth"]["copy_gbs"] * GB) for r in ranks)
        report["decode_floor_ms_per_token"] = 1000 * floor_s
        if engine["decode_ms_per_token"] is not None:
            report["decode_vs_floor"] = engine["decode_ms_per_token"] / (1000 * floor_s)
    peers: dict[str, Any] = {}
    if "naive" in result:
        peers["naive"] = result["naive"]
    if opts.compare_hf:
        import transformers

        hf = hf_model_from(model)
        for i in range(opts.warmup):
            time_hf(hf, prompts, min(2, opts.new_tokens), progress, f"transformers warm-up {i + 1}/{opts.warmup}")
        hf_runs: list[Timing] = []
        hf_tokens: list[list[int]] = []
        for i in range(opts.repeat):
            t, hf_tokens = time_hf(hf, prompts, opts.new_tokens, progress, f"transformers run {i + 1}/{opts.repeat}")
            hf_runs.append(t)
        del hf
        agree = sum(a == b for x, y in zip(tokens, hf_tokens, strict=True) for a, b in zip(x, y, strict=False))
        peers["transformers"] = {
            **asdict(median_timing(hf_runs, opts.batch_size, opts.prompt_len)),
            "version": transformers.__version__,
            "tokens_agree": agree / max(1, sum(len(x) for x in tokens)),
        }
    for peer in peers.values():
        peer["vs_engine"] = {
            k: (peer[k] / engine[k] if peer[k] and engine[k] else None)
            for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")
        }
    report["peers"] = peers
    report["machine"] = machine_info(rt.device)
    progress.close()
    if opts.json:
        print(json.dumps(report), flush=True)
    else:
        print_report(report)
