"""Attention backends on CPU.

xformers' kernel has no CPU implementation, but its attention-bias classes do (materialize()). So:
- the bias the xformers backend builds for every kind of step (first prefill, later chunk,
  decode, wrap-around, mixed lengths with empty rows, chunk > window, no window) is compared
  with the mask the SDPA path uses (StepContext.mask), mapped back through the gather indices;
- the backend's whole data path (gathers, GQA layout, padded decode layout, scatter back) runs
  through the model with a CPU stand-in for memory_efficient_attention that applies the
  materialized bias densely, and must give SDPA's tokens and logits.
Tests that need xformers are skipped (with the reason) when it is not installed:
`pip install --no-deps xformers` installs it next to the CPU torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from distributed.pipeline import GenerationParams, Pipeline
from model.args import ConfigError, ModelArgs
from model.attention import XformersAttention, XformersPlan, _padded_rows, get_backend, sdpa_attention, xformers_plan
from model.cache import RollingCache, StepContext, cache_capacity, mask_rule
from model.transformer import Transformer

pytestmark = pytest.mark.timeout(240)

TINY: dict[str, Any] = dict(dim=64, n_layers=4, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2,
                            norm_eps=1e-5, vocab_size=512)
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "dense": dict(TINY, sliding_window=8),
    "moe": dict(TINY, sliding_window=8, rope_theta=1e6, moe=dict(num_experts=4, num_experts_per_tok=2)),
    "nowindow": dict(TINY, head_dim=24),
    "mqa": dict(TINY, n_kv_heads=1, sliding_window=5),
}


def xformers_bias_module() -> Any:
    return pytest.importorskip("xformers.ops.fmha.attn_bias", reason="xformers is not installed")


# -- shared helpers (also used by test_gpu.py) ---------------------------------------------------


def build_model(params: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> Transformer:
    """A model with random weights of unit-scale activations (peaked logits)."""
    from common import random_state

    model = Transformer(ModelArgs.from_dict(params))
    model.load_state_dict(random_state(params, seed))
    return model.to(device=device, dtype=dtype).eval()


def make_prompts(lengths: tuple[int, ...], seed: int = 1, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Any) -> torch.Tensor:
    """memory_efficient_attention's semantics in plain torch, on any device: q [1, M, G, Hg, D],
    k/v [1, N, G, Hg, D], attn_bias an xformers bias -> [1, M, G, Hg, D]."""
    m, n, d = q.shape[1], k.shape[1], q.shape[-1]
    bias = attn_bias.materialize((m, n), dtype=torch.float32, device=q.device)
    scores = torch.einsum("mghd,nghd->ghmn", q[0].float(), k[0].float()) / math.sqrt(d) + bias
    out = torch.einsum("ghmn,nghd->mghd", scores.softmax(-1), v[0].float())
    return out[None].to(q.dtype)


class ReferenceOps:
    """A stand-in for xformers.ops: runs wherever torch does, applying the bias densely."""

    def __init__(self) -> None:
        self.calls = 0

    def memory_efficient_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   attn_bias: Any = None) -> torch.Tensor:
        self.calls += 1
        return reference_attention(q, k, v, attn_bias)


# -- simulating the engine's steps ---------------------------------------------------------------


def schedule(lens: list[int], new: list[int], chunk: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The positions [B, T] of every step the pipeline runs for one micro-batch: prefill chunks
    (rows whose prompt is over are padding), then decode steps (rows that are done are padding).
    Sequence b generates new[b] tokens. Yields (kind, positions)."""
    b = len(lens)
    for start in range(0, max(lens), chunk):
        t = min(chunk, max(lens) - start)
        pos = torch.full((b, t), -1, dtype=torch.long)
        for i, n in enumerate(lens):
            m = max(0, min(n - start, t))
            pos[i, :m] = torch.arange(start, start + m)
        yield ("first prefill" if start == 0 else "later chunk"), pos
    # The first new token comes from the prefill; each decode step feeds the previous one.
    for step in range(1, max(new)):
        pos = torch.tensor([[lens[i] + step - 1 if step < new[i] else -1] for i in range(b)])
        yield "decode", pos


def steps_of(lens: list[int], new: list[int], chunk: int, window: int | None) -> Iterator[tuple[str, StepContext]]:
    """Drive a real RollingCache through the schedule; yields each step's context before commit."""
    cap = cache_capacity(window, max(n + m for n, m in zip(lens, new, strict=True)))
    cache = RollingCache([0], len(lens), cap, window, n_kv_heads=1, head_dim=1, dtype=torch.float32, device="cpu")
    for kind, pos in schedule(lens, new, chunk):
        ctx = cache.step(slice(None), pos)
        ctx.kv(0, torch.zeros(*pos.shape, 1, 1), torch.zeros(*pos.shape, 1, 1))
        yield kind, ctx
        ctx.commit()


def bias_as_mask(plan: XformersPlan, b: int, t: int, k: int) -> torch.Tensor:
    """The bias of a plan mapped back to the step's coordinates: bool [B, T, K]. Asserts that it
    allows nothing across sequences and nothing outside the keys the step returns."""
    if plan.q_index is None:
        assert plan.kv_padding is not None and t == 1
        p = plan.kv_padding
        dense = plan.bias.materialize((b, b * p)) == 0  # [B, B * P]
        blocks = dense.view(b, b, p)
        off_diag = blocks & ~torch.eye(b, dtype=torch.bool)[:, :, None]
        assert not off_diag.any(), "a query attends another sequence's keys"
        own = blocks[torch.arange(b), torch.arange(b)]  # [B, P]
        assert not own[:, k:].any(), "a query attends a slot past the ones StepContext.kv returns"
        return own[:, None, :k]
    assert plan.k_index is not None
    mq, mk = plan.q_index.numel(), plan.k_index.numel()
    dense = plan.bias.materialize((mq, mk)) == 0  # [Mq, Mk]
    full = torch.zeros(b * t, b * k, dtype=torch.bool)
    full[plan.q_index[:, None], plan.k_index[None, :]] = dense
    full = full.view(b, t, b, k)
    cross = full & ~torch.eye(b, dtype=torch.bool)[:, None, :, None]
    assert not cross.any(), "a query attends another sequence's keys"
    return full[torch.arange(b), :, torch.arange(b)]  # [B, T, K]


SCENARIOS = {
    # name: (prompt lengths, new tokens per sequence, chunk, window)
    "one prompt, one chunk, decode within the window": ([5], [3], 8, 8),
    "one prompt, several chunks, wrap-around decode": ([19], [20], 8, 8),
    "mixed lengths, empty rows in later chunks, rows done early": ([3, 11, 1, 8], [12, 2, 5, 20], 4, 6),
    "chunk longer than the window": ([23, 9], [10, 14], 12, 4),
    "chunk of one token": ([6, 2], [4, 9], 1, 3),
    "window larger than the longest sequence (W < window)": ([7, 4], [5, 9], 4, 64),
    "no window": ([9, 17], [6, 3], 5, None),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_xformers_bias_equals_the_sdpa_mask(name: str) -> None:
    xformers_bias_module()
    lens, new, chunk, window = SCENARIOS[name]
    kinds: set[str] = set()
    for kind, ctx in steps_of(lens, new, chunk, window):
        pos = ctx.positions
        b, t = pos.shape
        k = ctx.key_positions.shape[1]
        plan = xformers_plan(pos, ctx.key_positions, window, ctx.write_first, k + 1 if ctx.write_first else None)
        assert plan is not None, f"{kind}: the engine's cache state must be expressible"
        assert (plan.q_index is None) == ctx.write_first
        got = bias_as_mask(plan, b, t, k)
        valid = pos >= 0
        # Valid queries: exactly the SDPA mask (which is mask_rule over the same keys).
        want = ctx.mask[:, 0]
        assert torch.equal(want, mask_rule(pos, ctx.key_positions, window) | ~valid[:, :, None])
        assert torch.equal(got[valid], want[valid]), f"{kind} step with positions {pos.tolist()}"
        # Padding queries attend nothing in the flattened layout (multi-token steps), or one slot.
        if not ctx.write_first:
            assert not got[~valid].any()
        kinds.add(kind)
        if ctx.write_first and (pos >= ctx.cache.capacity).any():
            kinds.add("wrap-around")
        if (~valid).all(1).any():
            kinds.add("empty row")
    assert {"first prefill", "decode"} <= kinds
    if name.startswith("mixed"):
        assert {"later chunk", "wrap-around", "empty row"} <= kinds
    if name.startswith("chunk longer"):
        assert "later chunk" in kinds


def test_xformers_bias_classes() -> None:
    """The classes used: prefill is a bottom-right causal local mask, decode padded keys."""
    xb = xformers_bias_module()
    pos = torch.tensor([[4, 5, 6], [0, 1, -1]])
    keys = torch.tensor([[-1, 2, 3, 1, 4, 5, 6], [-1, -1, -1, -1, 0, 1, -1]])  # 4 old slots + 3 new
    plan = xformers_plan(pos, keys, 3, single_token=False)
    assert plan is not None and plan.q_index is not None and plan.k_index is not None
    assert isinstance(plan.bias, xb.BlockDiagonalCausalLocalAttentionFromBottomRightMask)
    assert plan.q_index.tolist() == [0, 1, 2, 3, 4]
    # Row 0 needs keys 2..6 (key 1 is outside every query's window), in position order.
    assert plan.k_index.tolist() == [1, 2, 4, 5, 6, 7 + 4, 7 + 5]
    nowin = xformers_plan(pos, keys, None, single_token=False)
    assert nowin is not None and isinstance(nowin.bias, xb.BlockDiagonalCausalFromBottomRightMask)
    assert nowin.k_index is not None and len(nowin.k_index) == 8
    dec = xformers_plan(torch.tensor([[9], [-1]]), torch.tensor([[8, 9, 6, 7], [-1, -1, -1, -1]]), 8, True, 5)
    assert dec is not None and isinstance(dec.bias, xb.BlockDiagonalCausalWithOffsetPaddedKeysMask)
    assert dec.bias.k_seqinfo.seqlen.tolist() == [4, 1]  # a padding row gets one (finite, discarded) key


def test_xformers_plan_refuses_states_it_can_not_express() -> None:
    """Anything but consecutive keys up to the last query falls back to sdpa (None)."""
    xformers_bias_module()
    pos = torch.tensor([[4, 5]])
    assert xformers_plan(pos, torch.tensor([[2, -1, 3, 4, 5]]), 8, False) is not None
    assert xformers_plan(pos, torch.tensor([[1, -1, 3, 4, 5]]), 8, False) is None  # a gap (key 2 missing)
    assert xformers_plan(pos, torch.tensor([[3, 3, 3, 4, 5]]), 8, False) is None  # a repeated key
    assert xformers_plan(torch.tensor([[4, 6]]), torch.tensor([[3, 4, 6]]), 8, False) is None  # queries not consecutive
    assert xformers_plan(torch.tensor([[-1, 4]]), torch.tensor([[3, 4]]), 8, False) is None  # queries not a prefix
    # Decode: the slots the query sees must be slots 0 .. c-1.
    assert xformers_plan(torch.tensor([[2]]), torch.tensor([[0, 1, 2, -1]]), 8, True) is not None
    assert xformers_plan(torch.tensor([[2]]), torch.tensor([[-1, 1, 2, -1]]), 8, True) is None


def test_padded_rows_view_the_cache_without_a_copy() -> None:
    cache = RollingCache([0], 3, 5, 5, n_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    rows = cache.k[0][1:3]  # [2, W + 1, Hkv, D]
    flat, p = _padded_rows(rows[:, :5])
    assert p == 6 and flat.shape == (1, 12, 2, 4) and flat.data_ptr() == rows.data_ptr()
    rows.normal_()
    assert torch.equal(flat.view(2, 6, 2, 4), rows)
    flat, p = _padded_rows(torch.zeros(2, 5, 2, 4))
    assert p == 5 and flat.shape == (1, 10, 2, 4)


# -- the backend's data path through the model, with the CPU stand-in ----------------------------


def generate(model: Transformer, backend: Any, prompts: list[list[int]], **kw: Any) -> list[list[int]]:
    model.attention = backend
    params = GenerationParams(max_tokens=kw.pop("max_tokens", 24), eos_ids=(), **kw)
    return Pipeline(model, 0, 1, torch.device("cpu"), None).generate(prompts, params)


@pytest.mark.parametrize("config", list(MODEL_CONFIGS))
@pytest.mark.parametrize("chunk,microbatches", [(None, 1), (3, 2), (1, 1), (100, 3)])
def test_xformers_path_gives_sdpa_tokens(config: str, chunk: int | None, microbatches: int) -> None:
    xformers_bias_module()
    model = build_model(MODEL_CONFIGS[config])
    prompts = make_prompts((5, 19, 1, 33))
    ops = ReferenceOps()
    want = generate(model, sdpa_attention, prompts, chunk_size=chunk, num_microbatches=microbatches)
    got = generate(model, XformersAttention(ops), prompts, chunk_size=chunk, num_microbatches=microbatches)
    assert ops.calls > 0
    assert got == want
    assert len(set(want[3])) > 3  # a non-trivial continuation


@pytest.mark.parametrize("config", ["dense", "nowindow", "mqa"])
def test_xformers_path_logits_equal_sdpa(config: str) -> None:
    """Per-token logits through prefill chunks and decode steps, rows of different lengths."""
    xformers_bias_module()
    model = build_model(MODEL_CONFIGS[config])
    prompts = make_prompts((13, 4, 9))
    window = model.args.sliding_window
    lens, new = [len(p) for p in prompts], [8, 8, 8]

    def run(backend: Any) -> list[torch.Tensor]:
        model.attention = backend
        cap = cache_capacity(window, max(lens) + max(new))
        cache = model.make_cache(len(prompts), cap)
        outs = []
        g = torch.Generator().manual_seed(3)
        with torch.inference_mode():
            for _, pos in schedule(lens, new, 5):
                ids = torch.randint(3, 512, pos.shape, generator=g)
                logits = model(ids, pos, cache)  # [B, T, V]
                outs.append(torch.where((pos >= 0)[:, :, None], logits, 0))
        return outs

    want, got = run(sdpa_attention), run(XformersAttention(ReferenceOps()))
    for w, g in zip(want, got, strict=True):
        assert (w - g).abs().max().item() <= 1e-4


def test_xformers_falls_back_to_sdpa_for_an_inexpressible_step() -> None:
    xformers_bias_module()
    model = build_model(MODEL_CONFIGS["dense"])
    cache = model.make_cache(1, 8)
    cache.pos[0, :3] = torch.tensor([0, 2, 3])  # position 1 missing: not consecutive
    ops = ReferenceOps()
    model.attention = XformersAttention(ops)
    with torch.inference_mode(), pytest.warns(UserWarning, match="using sdpa"):
        got = model(torch.tensor([[5, 6]]), torch.tensor([[4, 5]]), cache)
    assert ops.calls == 0
    cache = model.make_cache(1, 8)
    cache.pos[0, :3] = torch.tensor([0, 2, 3])
    model.attention = sdpa_attention
    with torch.inference_mode():
        want = model(torch.tensor([[5, 6]]), torch.tensor([[4, 5]]), cache)
    assert torch.equal(got, want)


class NoKernelOps:
    """xformers.ops as it answers when no kernel fits the inputs."""

    def memory_efficient_attention(self, *args: Any, **kw: Any) -> torch.Tensor:
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")


def test_xformers_without_a_kernel_is_a_clear_error_or_falls_back_under_auto() -> None:
    xformers_bias_module()
    model = build_model(MODEL_CONFIGS["dense"])
    prompts = make_prompts((5, 12))
    with pytest.raises(ConfigError, match="xformers has no kernel for torch.float32 on cpu.*--attention sdpa"):
        generate(model, XformersAttention(NoKernelOps()), prompts, max_tokens=3)
    with pytest.warns(UserWarning, match="xformers attention failed for torch.float32 on cpu.*using sdpa"):
        got = generate(model, XformersAttention(NoKernelOps(), fallback=True), prompts, max_tokens=12, chunk_size=5)
    assert got == generate(model, sdpa_attention, prompts, max_tokens=12, chunk_size=5)


# -- choosing a backend --------------------------------------------------------------------------


def test_auto_and_sdpa_pick_sdpa_on_cpu() -> None:
    assert get_backend("auto", torch.device("cpu")) is sdpa_attention
    assert get_backend("sdpa", torch.device("cpu")) is sdpa_attention
    assert get_backend("sdpa", "cpu") is sdpa_attention


def test_xformers_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA device.*--attention sdpa"):
        get_backend("xformers", torch.device("cpu"))


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*auto, sdpa, xformers"):
        get_backend("flash", torch.device("cpu"))
