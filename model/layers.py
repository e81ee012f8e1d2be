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
        # Normalise in fp32 and cast back before the weight, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex rotations [B, T, 1, D/2] for positions [B, T] (padding -1 gets position 0):
    pair i of a head turns by position * theta^(-2i/D)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.clamp(min=0).to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] (Meta's / Mistral's layout)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, H, D/2]
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, layer: int, ctx: StepContext, backend: AttentionBackend) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = rotary(q, ctx.rope), rotary(k, ctx.rope)  # ctx.rope: computed once per step
        out = backend(q, k, v, layer, ctx)  # [B, T, H, D]
        return self.wo(out.reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
