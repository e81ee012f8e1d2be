"""Attention backends. Each takes q [B, T, H, D], this step's k/v [B, T, Hkv, D], the layer id
and the step context (which owns the cache and the mask) and returns [B, T, H, D].

- `sdpa`: torch scaled_dot_product_attention with the dense boolean mask of DESIGN.md's rule
  (`StepContext.mask`); any device.
- `xformers`: xformers' memory_efficient_attention (CUDA only: xformers has no CPU kernel) with
  a block-diagonal attention bias equal to the same rule. xformers is imported only when chosen.
- `auto`: xformers on CUDA when it imports (falling back to sdpa, with a warning, for inputs it
  has no kernel for), else sdpa.

How the xformers bias is exactly the mask rule. Within one step the valid queries of a row are a
prefix with consecutive positions p0 .. p0+n-1. Attention is invariant under a permutation of the
keys (given the mask), so the keys a row may attend can be gathered into position order. If the
keys that any query of the row may attend (0 <= k <= q_last, k > p0 - window) are exactly the
consecutive positions s .. q_last, then "k <= q and k > q - window" over them is xformers'
causal-local mask aligned at the bottom right of the row's (queries x keys) block. So:

- multi-token steps (prefill chunks): queries of all rows are flattened to [1, sum n_b, H, D],
  the keys each row may attend are gathered in position order to [1, sum k_b, Hkv, D], and the
  bias is `BlockDiagonalMask.from_seqlens(n, k).make_local_attention_from_bottomright(window)`
  (`make_causal_from_bottomright()` without a window). Rows with no token in the step are left
  out (their outputs, discarded by the caller, are zero).
- single-token steps (decode): the cache rows are used in place, in slot order, as padded keys
  ([1, B * row_stride, Hkv, D], no copy), with `BlockDiagonalCausalWithOffsetPaddedKeysMask`
  and kv_seqlen = the number of slots the query may attend. This is exact when those slots are
  slots 0 .. c-1 (they are: slot p % W is filled in position order from position 0, and every
  stored key is inside the window because W <= window); the query sees all c keys, so their
  order does not matter. Padding rows get kv_seqlen 1 (a finite, discarded output).

The plan checks these preconditions on the device (one small tensor); if any row breaks them
(a cache state the engine does not produce), the step falls back to sdpa, which is exact for
any state. Building the bias needs the per-row lengths on the host: that is ONE device->host sync
per step (not per layer: the plan is built at the first layer and reused by the others). The
pipeline already syncs once per step to read the sampled tokens, so the GPU is idle at that
point anyway.
"""

from __future__ import annotations

import importlib
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from model.args import ConfigError, first_line
from model.cache import mask_rule
from model.cpu_kernels import decode_attention, loaded_kernels

if TYPE_CHECKING:
    from model.cache import StepContext


class AttentionBackend(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext
    ) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext) -> torch.Tensor:
    """torch scaled_dot_product_attention with the boolean mask of DESIGN.md's rule; any device."""
    k_all, v_all = ctx.kv(layer, k, v)  # [B, K, Hkv, D]
    return _sdpa(q, k_all, v_all, ctx.mask)


def _sdpa(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, D], k_all/v_all [B, K, Hkv, D], mask [B, 1, T, K] -> [B, T, H, D]."""
    qt, kt, vt = q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)
    if q.device.type == "cuda" and kt.shape[1] != qt.shape[1]:
        # On CUDA, SDPA's GQA mode runs only in the flash kernel (which takes no mask) or the
        # unfused math kernel; with the kv heads repeated, the fused memory-efficient kernel
        # (which takes a mask) is eligible. Query head h uses kv head h // (H / Hkv), as in
        # enable_gqa.
        rep = qt.shape[1] // kt.shape[1]
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    elif q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[1] == 1:
        # One query per row (decode): PyTorch's CPU kernel for bf16 takes a slow path at one query,
        # 4-7x slower than the same attention upcast to fp32 (7B shape, 32 heads, 8 kv heads: 550 vs
        # 84 us at 64 keys, 6.4 vs 0.85 ms at 1024, 30 vs 7.5 ms at 4096; from 2 queries bf16 is
        # faster again). The fp32 sums are also the more exact (docs/benchmarks.md). Where the
        # engine's kernels are loaded (bf16 linears on them), its one-query kernel reads the bf16
        # cache in place instead of converting all of K and V to fp32 on every layer.
        kernels = loaded_kernels()
        if q.dtype == torch.bfloat16 and kernels is not None and _decode_kernel_fits(q, k_all, v_all):
            args = (q.squeeze(1), k_all, v_all, mask.reshape(q.shape[0], -1))
            # Eager calls the module directly: the custom op's Python dispatch costs ~20 us a call.
            out = decode_attention(*args) if torch.compiler.is_compiling() else kernels.decode_attention(*args)
            return out.unsqueeze(1)
        out = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), attn_mask=mask, enable_gqa=True)
        out = out.to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)  # [B, H, T, D]
    return out.transpose(1, 2)


def _decode_kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Can decode_attention take these shapes: the head dim a multiple of 16 and each key's heads
    contiguous (a slice of the cache)."""
    return q.shape[-1] % 16 == 0 and all(t.stride(3) == 1 and t.stride(2) == t.shape[3] for t in (k, v))


# -- xformers -------------------------------------------------------------------------------------


@dataclass
class XformersPlan:
    """How one step's attention maps onto xformers' flattened layout.

    bias: the xformers AttentionBias (materialize((len(q rows), len(k rows))) gives the dense
      additive mask over the flattened layout).
    q_index: flat indices into the step's B*T queries that form the flattened query rows, or
      None when every row has exactly one query slot and all B of them are used in order.
    k_index: flat indices into the B*K keys returned by `StepContext.kv`, grouped by row and in
      position order; None for the padded layout, where key row b*kv_padding + s is slot s of
      sequence b.
    kv_padding: slots per sequence in the padded layout (None otherwise).
    """

    bias: Any
    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    kv_padding: int | None


def xformers_plan(
    positions: torch.Tensor,
    key_positions: torch.Tensor,
    sliding_window: int | None,
    single_token: bool,
    kv_padding: int | None = None,
) -> XformersPlan | None:
    """The xformers layout and bias for one step, or None if the cache state can not be
    expressed exactly (then use sdpa).

    positions [B, T] (-1 = padding; valid tokens a prefix of each row), key_positions [B, K]
    (-1 = empty): as in StepContext. single_token: a write-first step (T == 1) whose keys are the
    cache slots; it uses the padded layout with `kv_padding` (>= K, default K) slots per row.
    Pure function of its inputs; one device->host transfer of a [3, B] tensor.
    """
    from xformers.ops.fmha import attn_bias as xb

    dev = positions.device
    b, t = positions.shape
    kk = key_positions.shape[1]
    q_valid = positions >= 0
    q_count = q_valid.sum(1)  # [B]
    slot = torch.arange(kk, device=dev)

    if single_token:
        assert t == 1, "single-token plan for a step with several tokens"
        padding = kk if kv_padding is None else kv_padding
        assert padding >= kk
        visible = mask_rule(positions, key_positions, sliding_window)[:, 0]  # [B, K]
        k_count = visible.sum(1)
        # The slots the query sees must be slots 0 .. c-1 (see the module docstring).
        ok = (visible == (slot < k_count[:, None])).all(1) | ~q_valid[:, 0]
        q_n, k_n, ok_n = torch.stack([q_count, k_count, ok.long()]).tolist()  # the one host sync
        if not all(ok_n):
            return None
        bias = xb.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=[1] * b, kv_padding=padding, kv_seqlen=[max(c, 1) for c in k_n], device=dev
        )
        return XformersPlan(bias, None, None, padding)

    first = positions[:, 0]  # the first valid position of each row (-1 if none)
    last = positions.max(1).values  # [B]
    steps = torch.arange(t, device=dev)
    # Valid queries: a prefix of consecutive positions.
    expected = torch.where(steps < q_count[:, None], first[:, None] + steps, torch.full_like(positions, -1))
    q_ok = (positions == expected).all(1)
    # The keys some query of the row may attend: 0 <= k <= last, k > first - window.
    lo = torch.zeros_like(first) if sliding_window is None else (first - sliding_window + 1).clamp(min=0)
    needed = (key_positions >= 0) & (key_positions <= last[:, None]) & (key_positions >= lo[:, None])
    needed &= (q_count > 0)[:, None]
    k_count = needed.sum(1)
    big = torch.iinfo(key_positions.dtype).max
    sorted_pos, order = torch.where(needed, key_positions, big).sort(dim=1, stable=True)  # needed keys first
    # ... and they must be consecutive positions ending at the last query's.
    run = sorted_pos[:, :1] + slot
    k_ok = ((sorted_pos == run) | (slot >= k_count[:, None])).all(1) & (sorted_pos[:, 0] + k_count - 1 == last)
    ok = (q_ok & k_ok) | (q_count == 0)
    q_n, k_n, ok_n = torch.stack([q_count, k_count, ok.long()]).tolist()  # the one host sync
    if not all(ok_n):
        return None
    rows = [i for i in range(b) if q_n[i] > 0]
    if not rows:
        q_index = torch.zeros(0, dtype=torch.long, device=dev)
        k_index = torch.zeros(0, dtype=torch.long, device=dev)
        bias = xb.BlockDiagonalMask.from_seqlens([0], [0], device=dev)
        return XformersPlan(bias, q_index, k_index, None)
    q_index = torch.cat([torch.arange(q_n[i]) + i * t for i in rows]).to(dev)
    k_row = torch.cat([torch.full((k_n[i],), i, dtype=torch.long) for i in rows]).to(dev)
    k_col = torch.cat([torch.arange(k_n[i]) for i in rows]).to(dev)
    k_index = k_row * kk + order[k_row, k_col]
    mask = xb.BlockDiagonalMask.from_seqlens([q_n[i] for i in rows], [k_n[i] for i in rows], device=dev)
    if sliding_window is None:
        bias = mask.make_causal_from_bottomright()
    else:
        bias = mask.make_local_attention_from_bottomright(sliding_window)
    return XformersPlan(bias, q_index, k_index, None)


def _padded_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, W, Hkv, D], rows of a larger buffer (the cache: W slots + a write-only bin) -> the
    same memory as [1, B * P, Hkv, D] with P = slots per row, without a copy where possible."""
    b, w, h, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 == 1 and s2 == d and s1 == h * d and s0 % (h * d) == 0 and s0 >= w * h * d:
        p = s0 // (h * d)
        try:
            return x.as_strided((1, b * p, h, d), (b * p * h * d, h * d, d, 1)), p
        except RuntimeError:  # the last row's padding lies outside the storage
            pass
    return x.contiguous().view(1, b * w, h, d), w


class XformersAttention:
    """The xformers backend (CUDA). Holds the plan of the current step (a weak reference to its
    StepContext, so the cache is never kept alive by the backend)."""

    def __init__(self, ops: Any = None, fallback: bool = False) -> None:
        # ops: an object with xformers.ops' memory_efficient_attention (tests pass a CPU stand-in).
        # fallback: when xformers has no kernel for the inputs (a dtype, a build without the
        # kernels), use sdpa for them with a warning (--attention auto) instead of failing.
        self._ops = importlib.import_module("xformers.ops") if ops is None else ops
        self._fallback = fallback
        self._unsupported: set[torch.dtype] = set()
        self._ctx: weakref.ref[StepContext] | None = None
        self._plan: XformersPlan | None = None
        self._warned = False

    def _plan_for(self, ctx: StepContext, kv_padding: int | None) -> XformersPlan | None:
        ref = self._ctx
        if ref is not None and ref() is ctx:
            return self._plan
        plan = xformers_plan(ctx.positions, ctx.key_positions, ctx.cache.sliding_window, ctx.write_first, kv_padding)
        if plan is None and not self._warned:
            self._warned = True
            warnings.warn(
                "xformers attention: a cache state outside the block-diagonal layout; using sdpa for such steps",
                stacklevel=3,
            )
        self._ctx, self._plan = weakref.ref(ctx), plan
        return plan

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext) -> torch.Tensor:
        if q.dtype in self._unsupported:
            return sdpa_attention(q, k, v, layer, ctx)
        b, t, h, d = q.shape
        hkv = k.shape[2]
        g = h // hkv
        k_all, v_all = ctx.kv(layer, k, v)  # [B, K, Hkv, D]
        if ctx.write_first:
            # Decode: attend over the cache rows in place (padded layout, no copy).
            k_flat, p = _padded_rows(k_all)
            v_flat, pv = _padded_rows(v_all)
            if pv != p:
                k_flat, v_flat, p = k_all.reshape(1, -1, hkv, d), v_all.reshape(1, -1, hkv, d), k_all.shape[1]
            plan = self._plan_for(ctx, p)
            if plan is None or plan.kv_padding != p:
                return _sdpa(q, k_all, v_all, ctx.mask)
            xq = q.reshape(1, b * t, hkv, g, d)
        else:
            plan = self._plan_for(ctx, None)
            if plan is None:
                return _sdpa(q, k_all, v_all, ctx.mask)
            assert plan.q_index is not None and plan.k_index is not None
            if plan.q_index.numel() == 0:
                return torch.zeros_like(q)
            kk = k_all.shape[1]
            xq = q.reshape(b * t, h, d).index_select(0, plan.q_index).view(1, -1, hkv, g, d)
            k_flat = k_all.reshape(b * kk, hkv, d).index_select(0, plan.k_index).view(1, -1, hkv, d)
            v_flat = v_all.reshape(b * kk, hkv, d).index_select(0, plan.k_index).view(1, -1, hkv, d)
        n_k = k_flat.shape[1]
        xk = k_flat.view(1, n_k, hkv, 1, d).expand(1, n_k, hkv, g, d)
        xv = v_flat.view(1, n_k, hkv, 1, d).expand(1, n_k, hkv, g, d)
        try:
            out = self._ops.memory_efficient_attention(xq, xk, xv, attn_bias=plan.bias)  # [1, M, Hkv, G, D]
        except Exception as e:
            # NotImplementedError: xformers' "No operator found for memory_efficient_attention...".
            # Under auto any failure of the kernel (e.g. a Triton kernel that does not build with
            # this Triton) falls back to sdpa; with --attention xformers only that one is reworded.
            if not self._fallback and not isinstance(e, NotImplementedError):
                raise
            why = first_line(e)
            if not self._fallback:
                raise ConfigError(
                    f"--attention xformers: xformers has no kernel for {q.dtype} on {q.device} ({why}); "
                    "use --attention sdpa (python -m xformers.info lists the kernels this build has)"
                ) from e
            warnings.warn(f"xformers attention failed for {q.dtype} on {q.device} ({why}); using sdpa", stacklevel=2)
            self._unsupported.add(q.dtype)
            return _sdpa(q, k_all, v_all, ctx.mask)
        out = out.reshape(-1, h, d)
        if plan.q_index is None:
            return out.view(b, t, h, d)
        return q.new_zeros(b * t, h, d).index_copy_(0, plan.q_index, out).view(b, t, h, d)


BACKENDS: tuple[str, ...] = ("auto", "sdpa", "xformers")


def xformers_available() -> bool:
    try:
        importlib.import_module("xformers.ops")
    except Exception:  # ImportError, or a broken build raising something else
        return False
    return True


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """The attention backend for `--attention name` on `device`."""
    device = torch.device(device)
    if name == "sdpa":
        return sdpa_attention
    if name == "auto":
        return XformersAttention(fallback=True) if device.type == "cuda" and xformers_available() else sdpa_attention
    if name == "xformers":
        if device.type != "cuda":
            raise ConfigError(
                f"--attention xformers needs a CUDA device (xformers has no {device.type} kernel); "
                "use --attention sdpa or auto"
            )
        try:
            return XformersAttention()
        except Exception as e:
            raise ConfigError(
                f"--attention xformers: xformers can not be imported ({type(e).__name__}: {e}); install a wheel "
                "built for this torch (pip install --no-deps xformers) or use --attention sdpa"
            ) from e
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
