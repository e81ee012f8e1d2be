#!/usr/bin/env python3
"""Decode throughput of a Mistral-7B-shaped model with random weights, through the engine's own
generation loop (distributed.pipeline.Pipeline with one stage).

    python scripts/gpu_bench.py                                   # 7B shape, bf16, CUDA, sdpa + xformers
    python scripts/gpu_bench.py --compile default --attention sdpa
    python scripts/gpu_bench.py --config configs/tiny.json --device cpu    # smoke test, any machine
    python scripts/gpu_bench.py --report results.jsonl           # only print the table of earlier runs

The weights are made on the device (no checkpoint on disk): the model is built on the meta device
in the target dtype, allocated with to_empty() and filled with small normal noise. For every
(attention, compile, batch): a short warm-up generation, then `--repeats` timed generations of
`--new_tokens` tokens after a `--prompt_len`-token prompt, eos_ids=() (every sequence runs to
the end). Time to first token (prefill + first sample) is taken from the on_token callback;
decode tokens/s counts the tokens after the first of each sequence over the time after the
first token (median of the repeats). Each finished row is appended to `--results` (JSON lines)
at once, so a later step (or a killed run) keeps what was measured; the markdown table of all
rows in that file is printed last.

The model is prepared as the engine prepares a loaded stage: projections fused (wq|wk|wv, w1|w3),
and with --quantize int8|int4 every linear quantized (model/quant.py) and laid out for its kernel.

--compile: none (eager); engine (the engine's own `--compile`: Transformer.compile_decode,
inductor on single-token steps); default (torch.compile of the whole forward for single-token
steps, fullgraph); cudagraphs (the same with mode="reduce-overhead": CUDA graphs; the cache
tensors are marked static and the cache is reused across generations so that the graphs stay
valid). Prefill stays eager. Compiling applies to sdpa only (the xformers plan needs a host
sync, which a graph can not hold).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distributed.pipeline import GenerationParams, Pipeline  # noqa: E402
from model.args import ModelArgs  # noqa: E402
from model.attention import get_backend, xformers_available  # noqa: E402
from model.cache import RollingCache  # noqa: E402
from model.layers import fuse_projections  # noqa: E402
from model.transformer import Transformer  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Transformer(args) with random weights, allocated directly on `device` in `dtype`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(old)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "tok_embeddings.weight":
                p.normal_(0.0, 1.0, generator=gen)
            else:  # [out, in]: unit-scale activations
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
    return model.eval()


def quantize_linears(model: Transformer, mode: str) -> None:
    """Every linear the engine quantizes at load, quantized the same way (in place, on its device)."""
    from torch import nn

    from model.quant import QuantLinear, is_quantizable, parse_quantize, quantize, spec_for

    spec = parse_quantize(mode)
    assert spec is not None
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}.weight".lstrip(".")
            if type(child) is nn.Linear and is_quantizable(full):
                s = spec_for(full, spec)
                parts = quantize(child.weight.detach(), s)
                setattr(parent, child_name, QuantLinear.from_tensors(parts, s, child.in_features))
                del parts, child


def prepare_like_the_engine(model: Transformer, quantize_mode: str) -> None:
    """launch/runtime.py's order: fuse the projections, quantize, fuse the quantized ones, lay out."""
    from model.quant import fuse_quantized
    from model.quant import prepare as prepare_quantized

    if quantize_mode == "none":
        fuse_projections(model)
        return
    quantize_linears(model, quantize_mode)
    fuse_quantized(model)
    prepare_quantized(model)


def use_compile(model: Transformer, mode: str) -> None:
    """Compile the single-token (decode) steps of model.forward; prefill stays eager."""
    if mode == "none":
        return
    if mode == "engine":
        model.compile_decode()
        return
    eager = model.forward
    compiled = torch.compile(
        eager, fullgraph=True, dynamic=False, mode="reduce-overhead" if mode == "cudagraphs" else None
    )

    def forward(
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: RollingCache,
        rows: slice | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.shape[1] == 1:
            if mode == "cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()  # a new decode step: earlier outputs are done
            out = compiled(x, positions, cache, rows, select)
            return out.clone() if mode == "cudagraphs" else out  # the graph's output buffer is reused
        return eager(x, positions, cache, rows, select)

    model.forward = forward  # type: ignore[method-assign]
    if mode == "cudagraphs":
        make_cache = model.make_cache
        kept: dict[tuple[int, int], RollingCache] = {}

        def reused_cache(batch_size: int, capacity: int) -> RollingCache:
            # CUDA graphs record the cache's addresses: keep one cache per shape and reset it.
            cache = kept.get((batch_size, capacity))
            if cache is None:
                cache = kept[(batch_size, capacity)] = make_cache(batch_size, capacity)
                for t in (*cache.k.values(), *cache.v.values(), cache.pos):
                    torch._dynamo.mark_static_address(t, guard=False)
            else:
                for t in (*cache.k.values(), *cache.v.values()):
                    t.zero_()
                cache.pos.fill_(-1)
            return cache

        model.make_cache = reused_cache  # type: ignore[method-assign]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(
    pipe: Pipeline, prompts: list[list[int]], new_tokens: int, device: torch.device
) -> tuple[float, float, int]:
    """(seconds to the first token, seconds after it, tokens after each sequence's first)."""
    first: list[float] = []
    count = [0]

    def on_token(seq: int, tok: int) -> None:
        if not first:
            first.append(time.perf_counter())
        count[0] += 1

    sync(device)
    t0 = time.perf_counter()
    out = pipe.generate(prompts, GenerationParams(max_tokens=new_tokens, eos_ids=()), on_token)
    sync(device)
    t1 = time.perf_counter()
    assert [len(o) for o in out] == [new_tokens] * len(prompts), "every sequence runs to max_tokens"
    assert count[0] == new_tokens * len(prompts)
    return first[0] - t0, t1 - first[0], count[0] - len(prompts)


def bench_one(
    model: Transformer, device: torch.device, batch: int, opts: argparse.Namespace, label: dict[str, Any]
) -> dict[str, Any]:
    pipe = Pipeline(model, 0, 1, device, None)
    g = torch.Generator().manual_seed(batch)
    vocab = model.args.vocab_size
    prompts = [[1] + torch.randint(3, vocab, (opts.prompt_len - 1,), generator=g).tolist() for _ in range(batch)]
    t = time.perf_counter()
    warm = min(opts.new_tokens, 8)
    for _ in range(2):  # kernels, autotuning, compilation, CUDA graphs; then once more, settled
        timed_generate(pipe, prompts, warm, device)
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [timed_generate(pipe, prompts, opts.new_tokens, device) for _ in range(opts.repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    decode_tokens = runs[0][2]
    steps = opts.new_tokens - 1
    row = dict(
        label,
        batch=batch,
        ttft_ms=round(1000 * ttft, 2),
        prefill_tok_s=round(batch * opts.prompt_len / ttft),
        decode_tok_s=round(decode_tokens / decode_s, 1) if decode_s > 0 else None,
        per_seq_tok_s=round(steps / decode_s, 1) if decode_s > 0 else None,
        ms_per_step=round(1000 * decode_s / max(steps, 1), 3),
        warmup_s=round(warmup_s, 1),
        peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    )
    return row


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = dict(torch=torch.__version__, python=platform.python_version())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        if xformers_available():
            import xformers

            env["xformers"] = xformers.__version__
    else:  # (importing xformers on a CPU-only machine only adds noise: it has no CPU kernel)
        env["cpu_threads"] = torch.get_num_threads()
    return env


def xformers_ops_used(model: Transformer, device: torch.device, dtype: torch.dtype) -> str:
    """Which xformers kernels the dispatcher picks for this model's prefill and decode layouts."""
    try:
        from xformers.ops import fmha
        from xformers.ops.fmha.dispatch import _dispatch_fw

        from model.attention import xformers_plan

        a = model.args
        g = a.n_heads // a.n_kv_heads
        names = []
        for single in (False, True):
            if single:
                pos = torch.tensor([[130]], device=device)
                keys = torch.arange(256, device=device)[None].where(torch.arange(256, device=device)[None] <= 130, -1)
                plan = xformers_plan(pos, keys, a.sliding_window, True, 257)
                m, n = 1, 257
            else:
                pos = torch.arange(128, device=device)[None]
                plan = xformers_plan(pos, torch.cat([torch.full_like(pos, -1), pos], 1), a.sliding_window, False)
                m = n = 128
            assert plan is not None
            q = torch.zeros(1, m, a.n_kv_heads, g, a.head_dim, device=device, dtype=dtype)
            k = torch.zeros(1, n, a.n_kv_heads, 1, a.head_dim, device=device, dtype=dtype).expand(
                1, n, a.n_kv_heads, g, a.head_dim
            )
            op = _dispatch_fw(fmha.Inputs(q, k, k, attn_bias=plan.bias), False)
            names.append(f"{'decode' if single else 'prefill'}: {op.NAME}")
        return ", ".join(names)
    except Exception as e:  # diagnostics only
        return f"unknown ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("attention", "attention"),
        ("compile", "compile"),
        ("batch", "batch"),
        ("quantize", "weights"),
        ("prompt_len", "prompt"),
        ("ttft_ms", "TTFT ms"),
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
        ("per_seq_tok_s", "tok/s per seq"),
        ("ms_per_step", "ms/step"),
        ("peak_gib", "peak GiB"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('attention')} | {r.get('compile')} | {r.get('batch')} | failed: {r['error']} |")
            continue
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r[k]) for k, _ in cols) + " |")
    return "\n".join(lines)


def report(path: Path, goal: float = 0.0) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    envs = {json.dumps(r.get("env", {}), sort_keys=True) for r in rows}
    print()
    for e in sorted(envs):
        print("environment:", e)
    shapes = {(r.get("config"), r.get("dtype"), r.get("prompt_len"), r.get("new_tokens")) for r in rows}
    for c, d, p, n in sorted(shapes, key=str):
        print(f"model {c}, {d}, prompt {p} tokens, {n} new tokens (decode tok/s: all sequences together)")
    print(table(rows) if rows else "(no results)")
    if goal:
        ok = [
            r
            for r in rows
            if r.get("batch") == 1
            and r.get("decode_tok_s")
            and r.get("config") == "mistral-7b.json"
            and r.get("quantize", "none") == "none"
        ]
        if ok:
            best = max(ok, key=lambda r: r["decode_tok_s"])
            verdict = "met" if best["decode_tok_s"] >= goal else "NOT met"
            print(
                f"goal: >= {goal:g} tok/s at batch 1 ({best.get('env', {}).get('gpu', '?')}): {verdict}; best "
                f"{best['decode_tok_s']} tok/s with attention={best['attention']}, compile={best['compile']}"
            )
        else:
            print(f"goal: >= {goal:g} tok/s at batch 1: no mistral-7b batch-1 result")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mistral-7b.json"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", nargs="+", default=["sdpa", "xformers"], choices=["sdpa", "xformers", "auto"])
    ap.add_argument("--compile", default="none", choices=["none", "engine", "default", "cudagraphs"])
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--results", default="", help="JSON-lines file the rows are appended to (default: a temp file)")
    ap.add_argument("--report", default="", help="only print the table of this results file")
    ap.add_argument("--goal", type=float, default=150.0, help="batch-1 decode tok/s to check the 7B results against")
    opts = ap.parse_args()
    if opts.report:
        report(Path(opts.report), opts.goal)
        return
    results = Path(opts.results or f"/tmp/gpu_bench_{os.getpid()}.jsonl")
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; use --device cpu (e.g. with --config configs/tiny.json)")
    dtype = DTYPES[opts.dtype]
    args = ModelArgs.from_json(Path(opts.config))
    t = time.perf_counter()
    model = random_model(args, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    prepare_like_the_engine(model, opts.quantize)
    log(
        f"model {Path(opts.config).name}: {n_params / 1e9:.2f}B parameters, {opts.dtype}, on {device} "
        f"in {time.perf_counter() - t:.1f}s"
    )
    env = environment(device)
    log(f"environment: {env}")
    if device.type == "cuda" and xformers_available():
        log(f"xformers kernels: {xformers_ops_used(model, device, dtype)}")
    use_compile(model, opts.compile)
    label_base = dict(
        config=Path(opts.config).name,
        dtype=opts.dtype,
        quantize=opts.quantize,
        prompt_len=opts.prompt_len,
        new_tokens=opts.new_tokens,
        env=env,
    )
    for name in opts.attention:
        for batch in opts.batch:
            label = dict(label_base, attention=name, compile=opts.compile)
            try:
                if name == "xformers" and (device.type != "cuda" or not xformers_available()):
                    raise RuntimeError("xformers unavailable" + (" on CPU" if device.type != "cuda" else ""))
                if name != "sdpa" and opts.compile != "none":
                    raise RuntimeError("compile is for sdpa only")
                backend = get_backend(name, device)
                model.attention = backend
                if name == "auto":
                    label["attention"] = f"auto={getattr(backend, '__name__', type(backend).__name__)}"
                row = bench_one(model, device, batch, opts, label)
            except Exception as e:
                if not isinstance(e, RuntimeError) or "unavailable" not in str(e) and "sdpa only" not in str(e):
                    traceback.print_exc()
                row = dict(label, batch=batch, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(json.dumps({k: v for k, v in row.items() if k != "env"}))
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
    report(results, opts.goal)


if __name__ == "__main__":
    main()
