"""What bench measures: timings from the token callbacks, the stage's busy time and KV bytes,
memory high-water marks and memory bandwidth."""

from __future__ import annotations

import functools
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distributed.pipeline import GenerationParams, Pipeline
from model.args import ModelArgs
from model.cache import cache_capacity

GB = 1e9
BOS_ID = 1


# -- small helpers ------------------------------------------------------------------------------


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """High-water mark of this process's resident set (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory in transparent huge pages (Linux; None elsewhere):
    whether the weights got 2 MiB pages (THP_MEM_ALLOC_ENABLE, set by `python -m launch`)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    out = {"copy_gbs": 2 * size / copy_s / GB, "read_gbs": size / read_s / GB, "buffer_bytes": float(size)}
    if device.type == "cpu" and n % 64 == 0:
        from model.cpu_kernels import blocked_kernels

        kernels = blocked_kernels()  # an AVX-512 sum reads faster than torch's: the better floor
        if kernels is not None:
            # one stream per thread, and four side by side (faster on this host in its fast state)
            out["read_simd_gbs"] = size / min(best(functools.partial(kernels.read_probe, src, s)) for s in (1, 4)) / GB
    return out
