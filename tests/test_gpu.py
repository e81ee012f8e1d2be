"""CUDA tests: skipped, with the reason shown (pytest -ra), on machines without a GPU.

scripts/gpu_check.sh runs them on a GPU machine. The xformers tests also need xformers
(skipped with the reason when it does not import).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from test_attention_backends import MODEL_CONFIGS, ReferenceOps, build_model, make_prompts, schedule

from distributed.pipeline import GenerationParams, Pipeline
from model.attention import XformersAttention, get_backend, sdpa_attention, xformers_available, xformers_plan
from model.cache import cache_capacity
from model.sampling import SamplingParams
from model.transformer import Transformer

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)"),
    pytest.mark.timeout(300),
]
CUDA = torch.device("cuda")
PROMPTS = make_prompts((5, 19, 1, 33))
MAX_TOKENS = 24


def xformers_kernel_missing() -> str | None:
    """Why xformers can not run here, or None: it must import and its CUDA kernel must run (a
    wheel built for another PyTorch imports but loads no kernels)."""
    if not xformers_available():
        return "xformers does not import (scripts/gpu_check.sh installs it from .whl/ when the wheel is there)"
    import xformers.ops as xops

    q = torch.zeros(1, 4, 2, 16, device=CUDA, dtype=torch.float32)
    try:
        xops.memory_efficient_attention(q, q, q)
    except NotImplementedError as e:
        return f"xformers has no CUDA kernel in this build for torch {torch.__version__}: {str(e).splitlines()[0]}"
    return None


XFORMERS_MISSING = xformers_kernel_missing() if torch.cuda.is_available() else "needs a CUDA GPU"


def needs_xformers() -> None:
    if XFORMERS_MISSING:
        pytest.skip(XFORMERS_MISSING)


def generate(model: Transformer, backend: Any, prompts: list[list[int]] = PROMPTS, **kw: Any) -> list[list[int]]:
    model.attention = backend
    params = GenerationParams(max_tokens=kw.pop("max_tokens", MAX_TOKENS), eos_ids=(), **kw)
    device = next(model.parameters()).device
    return Pipeline(model, 0, 1, device, None).generate(prompts, params)


def step_logits(model: Transformer, backend: Any, chunk: int = 5) -> list[torch.Tensor]:
    """Logits of every valid token through prefill chunks and decode steps (rows of different
    lengths, wrap-around past the window), as float32 on the CPU."""
    model.attention = backend
    device = next(model.parameters()).device
    lens, new = [13, 4, 9, 1], [10, 10, 3, 12]
    cache = model.make_cache(len(lens), cache_capacity(model.args.sliding_window, max(lens) + max(new)))
    g = torch.Generator().manual_seed(3)
    outs = []
    with torch.inference_mode():
        for _, pos in schedule(lens, new, chunk):
            ids = torch.randint(3, model.args.vocab_size, pos.shape, generator=g)
            logits = model(ids.to(device), pos.to(device), cache).float().cpu()
            outs.append(torch.where((pos >= 0)[:, :, None], logits, 0))
    return outs


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_auto_picks_xformers_on_cuda_when_it_imports() -> None:
    backend = get_backend("auto", CUDA)
    assert isinstance(backend, XformersAttention) if xformers_available() else backend is sdpa_attention
    assert get_backend("sdpa", CUDA) is sdpa_attention


@pytest.mark.parametrize("config", list(MODEL_CONFIGS))
def test_greedy_fp32_on_gpu_equals_cpu(config: str) -> None:
    want = generate(build_model(MODEL_CONFIGS[config]), sdpa_attention)
    gpu = build_model(MODEL_CONFIGS[config], device=CUDA)
    assert generate(gpu, get_backend("sdpa", CUDA)) == want
    if not XFORMERS_MISSING:  # fp32 runs in xformers' cutlass kernel
        assert generate(gpu, get_backend("xformers", CUDA)) == want


@pytest.mark.parametrize("config", list(MODEL_CONFIGS))
@pytest.mark.parametrize("chunk", [5, 1, 100])
def test_xformers_equals_sdpa_through_the_model(config: str, chunk: int) -> None:
    needs_xformers()
    fp32 = build_model(MODEL_CONFIGS[config], device=CUDA)
    ref32 = step_logits(fp32, sdpa_attention, chunk)
    assert max_diff(step_logits(fp32, get_backend("xformers", CUDA), chunk), ref32) <= 2e-3
    bf16 = build_model(MODEL_CONFIGS[config], device=CUDA, dtype=torch.bfloat16)
    sdpa16 = step_logits(bf16, sdpa_attention, chunk)
    xf16 = step_logits(bf16, get_backend("xformers", CUDA), chunk)
    # bf16 rounding: the two backends may differ by about as much as bf16 differs from fp32.
    bound = max(0.1, 2 * max_diff(sdpa16, ref32))
    assert max_diff(xf16, sdpa16) <= bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_xformers_kernel_equals_the_materialized_bias(dtype: torch.dtype) -> None:
    """The real memory_efficient_attention with each plan's bias (prefill: block-diagonal local
    from the bottom right; decode: padded keys) against the same bias applied densely."""
    needs_xformers()
    import xformers.ops as xops

    g = torch.Generator(device=CUDA).manual_seed(0)
    hkv, grp, d = 2, 4, 128
    wrapped = [256 + s if s <= 44 else s for s in range(256)]  # position 300 just written, W = 256
    cases = [  # positions [B, T], key positions [B, K], window, single token, kv padding
        (
            torch.tensor([[4, 5, 6], [0, 1, -1]]),
            torch.tensor([[-1, 2, 3, 1, 4, 5, 6], [-1] * 4 + [0, 1, -1]]),
            3,
            False,
            None,
        ),
        (
            torch.tensor([[300], [7], [-1]]),
            torch.tensor([wrapped, [s if s <= 7 else -1 for s in range(256)], [-1] * 256]),
            4096,
            True,
            257,
        ),
    ]
    for pos, keys, window, single, pad in cases:
        plan = xformers_plan(pos.to(CUDA), keys.to(CUDA), window, single, pad)
        assert plan is not None
        if plan.q_index is None:
            assert pad is not None
            m, n = pos.numel(), pos.shape[0] * pad
        else:
            assert plan.k_index is not None
            m, n = plan.q_index.numel(), plan.k_index.numel()
        q = torch.randn(1, m, hkv, grp, d, device=CUDA, generator=g).to(dtype)
        k = torch.randn(1, n, hkv, 1, d, device=CUDA, generator=g).to(dtype).expand(1, n, hkv, grp, d)
        v = torch.randn(1, n, hkv, 1, d, device=CUDA, generator=g).to(dtype).expand(1, n, hkv, grp, d)
        got = xops.memory_efficient_attention(q, k, v, attn_bias=plan.bias).float()
        want = ReferenceOps().memory_efficient_attention(q.float(), k.float(), v.float(), plan.bias)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert (got - want).abs().max().item() <= tol * math.sqrt(d) / 4, (dtype, single)


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_bf16_generation_on_gpu_runs(backend: str) -> None:
    if backend == "xformers":
        needs_xformers()
    model = build_model(MODEL_CONFIGS["moe"], device=CUDA, dtype=torch.bfloat16)
    attn = get_backend(backend, CUDA)
    out = generate(model, attn, chunk_size=3, num_microbatches=2)
    assert [len(o) for o in out] == [MAX_TOKENS] * len(PROMPTS)
    assert all(0 <= t < model.args.vocab_size for o in out for t in o)
    assert len(set(out[3])) > 3
    sampled = generate(model, attn, sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    assert sampled == generate(model, attn, sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    # bf16 follows fp32 for the first tokens at least (peaked logits; later ones may diverge).
    ref = generate(build_model(MODEL_CONFIGS["moe"], device=CUDA), sdpa_attention)
    assert sum(a[:2] == b[:2] for a, b in zip(out, ref, strict=True)) >= len(PROMPTS) - 1


@pytest.mark.parametrize("config,dtype", [("dense", torch.float32), ("moe", torch.float32), ("dense", torch.bfloat16)])
def test_compiled_decode_on_gpu_gives_the_eager_tokens(config: str, dtype: torch.dtype) -> None:
    """--compile on CUDA (inductor's triton kernels) against eager on CUDA; lengths past the window
    (8) and M = 2, so row slices, padding and wrap-around go through the compiled step."""
    from model.layers import fuse_projections

    eager = build_model(MODEL_CONFIGS[config], device=CUDA, dtype=dtype)
    compiled = build_model(MODEL_CONFIGS[config], device=CUDA, dtype=dtype)
    for m in (eager, compiled):
        fuse_projections(m)
    compiled.compile_decode()
    want = generate(eager, sdpa_attention, num_microbatches=2)
    assert generate(compiled, sdpa_attention, num_microbatches=2) == want
    assert compiled.compile_seconds > 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("n,k", [(256, 512), (96, 4096), (40, 96)])
def test_quantized_linear_on_gpu_equals_its_dequantized_weight(mode: str, n: int, k: int) -> None:
    """QuantLinear's CUDA path (int8: x @ q^T then the scales; int4: tinygemm where the shape allows,
    else dequantization) against F.linear with the dequantized canonical weight, for decode and
    prefill row counts."""
    from model.quant import QuantLinear, QuantSpec, dequantize, quantize

    spec = QuantSpec(mode, 32)
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    parts = quantize(w, spec)
    want_w = dequantize(parts, mode).to(CUDA)
    lin = QuantLinear.from_tensors({s: t.to(CUDA) for s, t in parts.items()}, spec, k)
    lin.prepare()
    fast = mode == "int8" or (k % 32 == 0 and n % 8 == 0 and torch.cuda.get_device_capability()[0] >= 8)
    assert lin.kernel == (f"{mode}cuda" if fast else "generic"), lin.kernel
    for rows in (1, 7, 300):
        x = torch.randn(rows, k, generator=g).to(CUDA)
        want = torch.nn.functional.linear(x, want_w)
        for dtype in (torch.bfloat16, torch.float32):
            got = lin(x.to(dtype)).float()
            assert got.shape == want.shape
            err = (got - want).abs().max().item()
            assert err <= 0.02 * want.abs().max().item() + 1e-3, (mode, rows, dtype, err)
