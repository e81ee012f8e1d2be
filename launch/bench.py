"""`python -m launch bench`: how fast, how big, and against whom.

    python -m launch bench --config configs/tiny.json --batch_size 4 --new_tokens 32 --json
    torchrun --nproc-per-node 2 -m launch bench <model_dir> --num_pipeline_ranks 2 --threads 1

The model is either a checkpoint directory or a params.json-style config (`--config`) whose
stage is built with random weights in memory, each rank only its own share (nothing on disk).
Every generation runs with eos_ids=(), so each sequence produces exactly --new_tokens tokens.

Timing (rank 0, from the token callbacks of Pipeline.generate):
  ttft_s         start -> first token of any sequence
  prefill_s      start -> every sequence has its first token; prefill_tok_s = batch*prompt_len/prefill_s
  decode_tok_s   tokens that arrive after prefill_s, divided by the time from prefill_s to the end
  decode_ms_per_token  1000 * batch / decode_tok_s: the time between two tokens of one sequence
Memory (every rank): peak RSS (getrusage high-water mark, so it includes the interpreter and torch),
GPU peak allocated bytes on CUDA, the KV cache this rank allocated, and its weight bytes.

Peers, measured in the same job with the same model, prompts, threads and dtype:
  --compare_naive  the schedule of Mistral's reference implementation: one micro-batch (M = 1) and
                   the whole prompt in one chunk, so exactly one stage is busy at any time
  --compare_hf     Hugging Face transformers' generate (greedy, same prompts and token count), P = 1
                   only, on the same weight tensors (no second copy; wq/wk are permuted copies)
Each peer is reported with `vs_engine`: the peer's number divided by the engine's.

--bandwidth measures memory bandwidth on each rank (one rank at a time, with its own threads) by
copying a large buffer, and reports the decode floor: the bytes a decode step must stream (every
weight except the embedding table, which is only gathered) divided by that bandwidth.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distributed.partition import stage_layers
from distributed.pipeline import DEFAULT_CHUNK_NO_WINDOW, GenerationParams, Pipeline
from launch.bench_hf import hf_model_from, time_hf
from launch.options import RunOptions
from launch.runtime import Runtime, log
from model.args import ConfigError, ModelArgs
from model.attention import get_backend
from model.cache import cache_capacity
from model.checkpoint import DTYPES, parse_dtype
from model.cpu_kernels import pack_linears
from model.layers import fuse_projections
from model.sampling import SamplingParams
from model.transformer import Transformer

GB = 1e9
RSS_SLACK_BYTES = 0.5e9  # the issue's memory goal: peak RSS <= 1.15 x weights + cache + 0.5 GB
RSS_WEIGHT_FACTOR = 1.15
BOS_ID = 1


@dataclass
class BenchOptions(RunOptions):
    """Measure time to first token, prefill and decode throughput, peak memory per rank and KV-cache
    bytes, for a model directory or a config with random weights (--config, nothing on disk).
    Every run generates exactly --new_tokens tokens per prompt (no EOS stop); --max_tokens is unused."""

    config: str | None = None  # params.json-style config (e.g. configs/tiny.json): random weights, built in memory
    batch_size: int = 1  # prompts generated together
    prompt_len: int = 64  # tokens per prompt (BOS + random ids)
    new_tokens: int = 32  # tokens generated per prompt
    warmup: int = 1  # untimed runs first (2 new tokens each), so one-time set-up costs are not measured
    repeat: int = 1  # measured runs; each number reported is the median over them
    json: bool = False  # print one JSON object on stdout (rank 0) instead of the table
    compare_hf: bool = False  # also run Hugging Face transformers' generate in this process (P = 1 only)
    compare_naive: bool = False  # also run the naive schedule (M = 1, whole prompt in one chunk) in this job
    bandwidth: bool = False  # measure memory bandwidth per rank with a large copy; report the decode floor
    bandwidth_mb: int = 1024  # size of the buffer copied by --bandwidth, in MB
    init_seed: int = 0  # seed of the random weights built for --config
    quiet: bool = False  # no progress line on stderr


def add_bench_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "bench",
        help="measure latency, throughput and memory (optionally against peers)",
        description=BenchOptions.__doc__,
    )
    sp.add_arguments(BenchOptions, dest="opts")


# -- small helpers ------------------------------------------------------------------------------


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """High-water mark of this process's resident set (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def make_prompts(batch: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    """BOS followed by random ids: the same prompts for the engine and every peer."""
    g = torch.Generator().manual_seed(seed)
    low = min(3, vocab - 1)
    return [[BOS_ID % vocab] + torch.randint(low, vocab, (length - 1,), generator=g).tolist() for _ in range(batch)]


def kv_bytes_formula(args: ModelArgs, n_layers: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for `n_layers` layers: the rolling cache holds W + 1 slots per sequence
    (W = min(window, seq_len); the extra slot is the padding bin of model/cache.py)."""
    w = cache_capacity(args.sliding_window, seq_len)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return 2 * n_layers * batch * (w + 1) * args.n_kv_heads * args.head_dim * itemsize


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.dirty = False

    def __call__(self, msg: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        if self.tty:
            print(f"\r\033[K[bench] {msg}", end="", file=sys.stderr, flush=True)
            self.dirty = True
        else:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.dirty:
            print(file=sys.stderr, flush=True)
            self.dirty = False


# -- the timed runs -----------------------------------------------------------------------------


@dataclass
class Timing:
    ttft_s: float
    prefill_s: float
    prefill_tok_s: float
    decode_s: float | None
    decode_tokens: int
    decode_tok_s: float | None
    decode_ms_per_token: float | None
    total_s: float
    generated_tokens: int


def summarize(
    t0: float, first: dict[int, float], stamps: list[float], t_end: float, batch: int, prompt_len: int
) -> Timing:
    prefill_end = max(first.values())
    decode = [t for t in stamps if t > prefill_end]
    decode_s = t_end - prefill_end
    decode_tok_s = len(decode) / decode_s if decode and decode_s > 0 else None
    prefill_s = prefill_end - t0
    return Timing(
        ttft_s=min(first.values()) - t0,
        prefill_s=prefill_s,
        prefill_tok_s=batch * prompt_len / prefill_s,
        decode_s=decode_s if decode else None,
        decode_tokens=len(decode),
        decode_tok_s=decode_tok_s,
        decode_ms_per_token=1000.0 * batch / decode_tok_s if decode_tok_s else None,
        total_s=t_end - t0,
        generated_tokens=len(stamps),
    )


def median_timing(runs: list[Timing], batch: int, prompt_len: int) -> Timing:
    """Medians of the times and of the decode rate; the other rates follow from them, so the
    numbers of one report stay consistent with each other."""
    med = statistics.median
    prefill_s = med(r.prefill_s for r in runs)
    rates = [r.decode_tok_s for r in runs]
    decode_tok_s = None if any(x is None for x in rates) else med(x for x in rates if x is not None)
    decode_s = [r.decode_s for r in runs]
    return Timing(
        ttft_s=med(r.ttft_s for r in runs),
        prefill_s=prefill_s,
        prefill_tok_s=batch * prompt_len / prefill_s,
        decode_s=None if any(x is None for x in decode_s) else med(x for x in decode_s if x is not None),
        decode_tokens=statistics.median_low(r.decode_tokens for r in runs),
        decode_tok_s=decode_tok_s,
        decode_ms_per_token=1000.0 * batch / decode_tok_s if decode_tok_s else None,
        total_s=med(r.total_s for r in runs),
        generated_tokens=runs[0].generated_tokens,
    )


def time_engine(
    pipeline: Pipeline, prompts: list[list[int]], params: GenerationParams, progress: Progress, label: str
) -> tuple[Timing, list[list[int]]]:
    batch, n = len(prompts), params.max_tokens
    first: dict[int, float] = {}
    stamps: list[float] = []

    def on_token(b: int, tok: int) -> None:
        now = time.perf_counter()
        stamps.append(now)
        first.setdefault(b, now)
        if len(first) < batch:
            progress(f"{label}: prefill, {len(first)}/{batch} sequences have a first token")
        else:
            progress(f"{label}: decode {len(stamps)}/{batch * n} tokens, {len(stamps) / (now - t0):.1f} tokens/s")

    progress(f"{label}: prefill", force=True)
    t0 = time.perf_counter()
    out = pipeline.generate(prompts, params, on_token=on_token)
    t_end = time.perf_counter()
    return summarize(t0, first, stamps, t_end, batch, len(prompts[0])), out


# -- building the stage -------------------------------------------------------------------------


def random_stage(
    args: ModelArgs, layers: list[int], first: bool, last: bool, dtype: torch.dtype, device: torch.device, seed: int
) -> Transformer:
    """This rank's modules with random weights, allocated directly in `dtype` (no fp32 detour).
    Each tensor is seeded by its name, so every layout (any P, any split) builds the same model."""
    with torch.device("meta"):
        model = Transformer(args, layers, first, last).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            std = 1.0 if name == "tok_embeddings.weight" else 1.0 / math.sqrt(p.shape[1])
            p.normal_(0.0, std, generator=g)
    return model.eval()


def build_pipeline(rt: Runtime, opts: BenchOptions) -> tuple[Pipeline, str]:
    """The rank's stage from a model directory or from --config (random weights)."""
    if opts.config is None:
        assert opts.model_dir is not None
        from model.formats import open_source

        return rt.load(open_source(opts.model_dir)), str(opts.model_dir)
    path = Path(opts.config)
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist (see configs/ for presets)")
    args = ModelArgs.from_json(path)
    split = stage_layers(args.n_layers, rt.n_stages, opts.layer_split)
    if rt.rank == 0:
        spans = ", ".join(f"{x[0]}-{x[-1]}" for x in split)
        log(f"bench: {args.n_layers} layers over {len(split)} stage(s) (layers {spans}), random weights")
    dtype = parse_dtype(opts.dtype) or torch.float32
    model = random_stage(
        args, split[rt.rank], rt.rank == 0, rt.rank == rt.n_stages - 1, dtype, rt.device, opts.init_seed
    )
    model.attention = get_backend(opts.attention, rt.device)
    fuse_projections(model)  # as Runtime.load does: fused q|k|v and w1|w3, then
    pack_linears(model)  # CPU bf16 linears on oneDNN's packed layout
    from distributed.p2p import Links

    links = Links(rt.rank, rt.n_stages, rt.device) if rt.n_stages > 1 else None
    return Pipeline(model, rt.rank, rt.n_stages, rt.device, links), f"{path} (random weights)"


class StageRecorder:
    """Wraps this rank's Stage: the KV-cache bytes each request allocates, and per request the time
    spent computing (Stage.run) against the request's span (begin -> end): the stage's utilisation.
    On CUDA the compute time only counts what the host waits for (kernels are asynchronous)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.kv_bytes = 0
        self.requests: list[tuple[float, float]] = []  # (busy seconds, span seconds) per request
        self._busy, self._t0 = 0.0, 0.0
        stage = pipeline.stage
        begin, run, end = stage.begin, stage.run, stage.end

        def wrapped_begin(batch: int, capacity: int, params: GenerationParams) -> None:
            begin(batch, capacity, params)
            assert stage.cache is not None
            self.kv_bytes = max(self.kv_bytes, stage.cache.nbytes)
            self._busy, self._t0 = 0.0, time.perf_counter()

        def wrapped_run(rows: slice, x: torch.Tensor, positions: torch.Tensor, sample_now: bool) -> torch.Tensor:
            t = time.perf_counter()
            try:
                return run(rows, x, positions, sample_now)
            finally:
                self._busy += time.perf_counter() - t

        def wrapped_end() -> None:
            end()
            self.requests.append((self._busy, time.perf_counter() - self._t0))

        stage.begin = wrapped_begin  # type: ignore[method-assign]
        stage.run = wrapped_run  # type: ignore[method-assign]
        stage.end = wrapped_end  # type: ignore[method-assign]


# -- memory bandwidth ---------------------------------------------------------------------------


def measure_bandwidth(nbytes: int, device: torch.device, iters: int = 5) -> dict[str, float]:
    """Best of `iters`: copy bandwidth (bytes read + bytes written per second, as STREAM counts it)
    and read bandwidth (a sum over the buffer). Uses this process's torch threads."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        return min(times)

    best(lambda: dst.copy_(src))  # first touch
    copy_s = best(lambda: dst.copy_(src))
    read_s = best(lambda: src.sum())
    size = n * 4
    return {"copy_gbs": 2 * size / copy_s / GB, "read_gbs": size / read_s / GB, "buffer_bytes": float(size)}


# -- Hugging Face peer --------------------------------------------------------------------------


def check_options(opts: BenchOptions) -> None:
    from launch.cli import validate

    validate(opts)
    if (opts.config is None) == (opts.model_dir is None):
        raise ConfigError("give either a model directory or --config <params.json> (random weights), not both")
    for name in ("batch_size", "prompt_len", "new_tokens", "repeat", "bandwidth_mb"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(opts, name)}")
    if opts.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {opts.warmup}")
    if opts.compare_hf and opts.num_pipeline_ranks != 1:
        raise ConfigError("--compare_hf runs transformers in the same process, which needs the whole model: use P = 1")
    if opts.compare_hf and importlib.util.find_spec("transformers") is None:
        raise ConfigError(
            "--compare_hf needs Hugging Face transformers, an optional extra: pip install 'transformers>=4.45' "
            "(or pip install -e '.[test]')"
        )
    if opts.compare_hf and opts.temperature > 0:
        raise ConfigError("--compare_hf compares greedy generation: leave --temperature at 0")


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
    if opts.max_tokens != RunOptions.max_tokens:
        raise ConfigError("bench generates exactly --new_tokens tokens per prompt: use --new_tokens, not --max_tokens")
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
                warm = replace(p, max_tokens=min(2, opts.new_tokens))
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
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "streamed_bytes": sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if n != "tok_embeddings.weight"
        ),
        "kv_bytes": recorder.kv_bytes,
        "requests": recorder.requests,
        "load_s": load_s,
        "base_rss_bytes": base_rss,
        "loaded_rss_bytes": loaded_rss,
        "peak_rss_bytes": rss_high,
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


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(r: dict[str, Any]) -> None:
    print(
        f"model {r['model']}, {r['dtype']} on {r['device']}, P={r['num_pipeline_ranks']} "
        f"M={r['num_microbatches']} chunk={r['chunk_size']} threads/rank={r['threads_per_rank']}"
    )
    print(
        f"batch {r['batch_size']} x prompt {r['prompt_len']} tokens, {r['new_tokens']} new tokens each "
        f"(median of {r['repeat']} run(s) after {r['warmup']} warm-up)"
    )
    print(f"  time to first token   {r['ttft_s'] * 1000:10.1f} ms")
    print(f"  prefill               {r['prefill_tok_s']:10.1f} tokens/s  ({r['prefill_s'] * 1000:.1f} ms)")
    print(
        f"  decode                {_fmt(r['decode_tok_s'], '10.1f')} tokens/s  "
        f"({_fmt(r['decode_ms_per_token'], '.1f')} ms per token per sequence)"
    )
    if "decode_floor_ms_per_token" in r:
        print(
            f"  decode floor          {r['decode_floor_ms_per_token']:10.1f} ms per token (bandwidth), "
            f"engine at {_fmt(r.get('decode_vs_floor'), '.2f')}x"
        )
    print(f"  KV cache              {_fmt_bytes(r['kv_bytes'])} in all")
    util = ", ".join(_fmt(u, ".0%") for u in r["utilization"])
    print(f"  stage utilisation     {util} (time in the stage's compute / request time, per rank)")
    for rk in r["ranks"]:
        bw = rk.get("bandwidth")
        print(
            f"  rank {rk['rank']}: layers {rk['layers'][0]}-{rk['layers'][1]}, weights {_fmt_bytes(rk['weight_bytes'])}"
            f", KV {_fmt_bytes(rk['kv_bytes'])}, peak RSS {_fmt_bytes(rk['peak_rss_bytes'])}"
            f" (budget {_fmt_bytes(rk['rss_budget_bytes'])})"
            + (f", GPU peak {_fmt_bytes(rk['gpu_peak_bytes'])}" if rk["gpu_peak_bytes"] is not None else "")
            + (f", copy {bw['copy_gbs']:.1f} GB/s" if bw else "")
        )
    for name, p in r["peers"].items():
        v = p["vs_engine"]
        print(
            f"  peer {name:12s} ttft {p['ttft_s'] * 1000:.1f} ms, prefill {p['prefill_tok_s']:.1f} tokens/s, "
            f"decode {_fmt(p['decode_tok_s'], '.1f')} tokens/s; vs engine: decode x{_fmt(v['decode_tok_s'], '.2f')}"
            f", prefill x{_fmt(v['prefill_tok_s'], '.2f')}"
        )
