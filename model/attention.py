"""Attention backends. Each takes q [B, T, H, D], this step's k/v [B, T, Hkv, D], the layer id
and the step context (which owns the cache and the mask) and returns [B, T, H, D]."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.cache import StepContext


class AttentionBackend(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext
    ) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext) -> torch.Tensor:
    """torch scaled_dot_product_attention with the boolean mask of DESIGN.md's rule; any device."""
    k_all, v_all = ctx.kv(layer, k, v)  # [B, K, Hkv, D]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=ctx.mask, enable_gqa=True
    )  # [B, H, T, D]
    return out.transpose(1, 2)


BACKENDS: dict[str, AttentionBackend] = {"sdpa": sdpa_attention}


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    if name in ("auto", "sdpa"):
        return sdpa_attention
    raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
