from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.attention import AttentionBackend
from model.cache import StepContext


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 and cast back before the weight, as the reference does (x * rsqrt(mean(x^2)
        # + eps) in fp32: rms_norm's fused kernel, 4 ops a call instead of 8).
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, real: bool = False) -> torch.Tensor:
    """Unit complex rotations [B, T, 1, D/2] for positions [B, T] (padding -1 gets position 0):
    pair i of a head turns by position * theta^(-2i/D). real: the same as (cos, sin) pairs
    [B, T, 1, D/2, 2], for compiled steps (inductor generates no code for complex tensors)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.clamp(min=0).to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    if real:
        return torch.stack([angles.cos(), angles.sin()], dim=-1)[:, :, None]
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] (Meta's / Mistral's layout)
    by rot from rope_tables (complex, or real (cos, sin) pairs)."""
    if rot.is_complex():  # eager: one complex multiply is the fewest ops
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, H, D/2]
        return torch.view_as_real(xc * rot).flatten(-2).type_as(x)
    xr = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    x0, x1, cos, sin = xr[..., 0], xr[..., 1], rot[..., 0], rot[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: nn.Linear | None = None  # [wq; wk; wv] once fuse_projections() has run

    def forward(self, x: torch.Tensor, layer: int, ctx: StepContext, backend: AttentionBackend) -> torch.Tensor:
        b, t, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:  # one GEMM: [B, T, (H + 2 Hkv) * D]
            qkv = self.wqkv(x)
            # q and k are adjacent: one rotary call over their H + Hkv heads (ctx.rope: computed once
            # per step), half the ops of two; q and k are then views of its output, v of the GEMM's.
            q, k = rotary(qkv[..., : (h + hkv) * d].view(b, t, h + hkv, d), ctx.rope).split([h, hkv], dim=2)
            v = qkv[..., (h + hkv) * d :].view(b, t, hkv, d)
        else:
            q = rotary(self.wq(x).view(b, t, h, d), ctx.rope)  # [B, T, H, D]
            k = rotary(self.wk(x).view(b, t, hkv, d), ctx.rope)  # [B, T, Hkv, D]
            v = self.wv(x).view(b, t, hkv, d)
        out = backend(q, k, v, layer, ctx)  # [B, T, H, D]
        return self.wo(out.reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Linear | None = None  # [w1; w3] once fuse_projections() has run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)  # [..., hidden] each
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    """Mixtral feed-forward: top-k of the router logits, softmax over those k, weighted sum."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.moe is not None
        self.k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, dim]
        top_logits, top_idx = torch.topk(self.gate(flat), self.k, dim=-1)  # [N, k]
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            # Only the tokens routed to expert e go through it.
            token, slot = torch.where(top_idx == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = MoeLayer(args) if args.moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, layer: int, ctx: StepContext, backend: AttentionBackend) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), layer, ctx, backend)
        return h + self.feed_forward(self.ffn_norm(h))


# -- fused projections -----------------------------------------------------------------------------
# Checkpoints (and load_stage, LoRA merging, the tests' state dicts) use the separate wq/wk/wv and
# w1/w3 names. After loading, one concatenated nn.Linear replaces each group: fewer, larger GEMMs
# (a decode step on a small model is op dispatch; on a large one, fewer GEMV calls keep every thread
# streaming). The fused modules are plain nn.Linear, so later passes (packing, quantization) treat
# them like any other linear.

_GROUPS = {Attention: ("wqkv", ("wq", "wk", "wv")), FeedForward: ("w13", ("w1", "w3"))}


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([p.weight.detach() for p in parts])  # [sum out, in]
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Replace wq|wk|wv by one `wqkv` and w1|w3 by one `w13` (every dense FFN and every MoE expert)
    in place, one group at a time (peak memory: one group's extra copy). Returns the groups fused.
    Call after loading (names on disk are the separate ones) and before packing or quantizing."""
    n = 0
    # Only the parents are listed: a list of every module would keep each replaced linear (and its
    # weight) alive until the loop ends, i.e. a second copy of the stage's weights at the peak.
    for mod in [m for m in model.modules() if type(m) in _GROUPS]:
        group = _GROUPS[type(mod)]
        if getattr(mod, group[0]) is not None:
            continue
        fused_name, names = group
        parts = [getattr(mod, name) for name in names]
        if any(type(p) is not nn.Linear or p.weight.is_meta for p in parts):
            continue  # already packed or quantized, or not loaded: leave the group as it is
        setattr(mod, fused_name, _concat_linear(parts))
        for name in names:
            delattr(mod, name)
        n += 1
    return n


def unfuse_projections(model: nn.Module) -> int:
    """Undo fuse_projections in place: the separate linears again, their weights views of the fused
    one (no copy). For code that needs the checkpoint's names (the transformers peer of bench)."""
    n = 0
    for mod in list(model.modules()):
        group = _GROUPS.get(type(mod))
        fused = getattr(mod, group[0]) if group is not None else None
        if group is None or fused is None:
            continue
        fused_name, names = group
        w = fused.weight.detach()
        if w.is_mkldnn:
            w = w.to_dense()
        if fused_name == "wqkv":
            assert isinstance(mod, Attention)
            kv = mod.n_kv_heads * mod.head_dim
            sizes = [mod.n_heads * mod.head_dim, kv, kv]
        else:
            sizes = [w.shape[0] // 2] * 2
        for name, part in zip(names, w.split(sizes), strict=True):
            lin = nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(part, requires_grad=False)
            setattr(mod, name, lin)
        setattr(mod, fused_name, None)
        n += 1
    return n
