from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.args import ModelArgs
from model.attention import AttentionBackend, sdpa_attention
from model.cache import RollingCache
from model.layers import RMSNorm, TransformerBlock, rope_tables


class Transformer(nn.Module):
    """The whole model, or one pipeline stage of it.

    A stage owns a contiguous range of layers (kept in a ModuleDict keyed by the *global* layer
    index, so parameter names equal checkpoint names); the first stage also owns tok_embeddings,
    the last owns norm and output. Modules a stage does not own are None and skipped.
    """

    def __init__(
        self, args: ModelArgs, layers: Sequence[int] | None = None, first: bool = True, last: bool = True
    ) -> None:
        super().__init__()
        self.args = args
        self.layer_ids = list(range(args.n_layers) if layers is None else layers)
        # Passing the (uninitialised) weight skips Embedding's normal_() init, which costs ~2.5 s the
        # first time it runs on the meta device; weights always come from a checkpoint anyway.
        self.tok_embeddings = (
            nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim)) if first else None
        )
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in self.layer_ids})
        self.norm = RMSNorm(args.dim, args.norm_eps) if last else None
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False) if last else None
        self.attention: AttentionBackend = sdpa_attention

    @property
    def is_first(self) -> bool:
        return self.tok_embeddings is not None

    @property
    def is_last(self) -> bool:
        return self.output is not None

    def make_cache(self, batch_size: int, capacity: int) -> RollingCache:
        p = next(self.parameters())
        return RollingCache(
            self.layer_ids,
            batch_size,
            capacity,
            self.args.sliding_window,
            self.args.n_kv_heads,
            self.args.head_dim,
            p.dtype,
            p.device,
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: RollingCache,
        rows: slice | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: token ids [B, T] on the first stage, else activations [B, T, dim].
        positions [B, T]: absolute positions, -1 for padding. rows: the cache rows of this batch.
        select [B]: on the last stage, the index in T whose logits to return ([B, vocab]);
        without it the last stage returns logits for every token [B, T, vocab].
        Other stages return activations [B, T, dim]."""
        ctx = cache.step(slice(None) if rows is None else rows, positions)
        ctx.rope = rope_tables(positions, self.args.head_dim, self.args.theta)
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for i in self.layer_ids:
            h = self.layers[str(i)](h, i, ctx, self.attention)
        ctx.commit()
        if self.norm is None or self.output is None:
            return h
        if select is not None:
            h = h[torch.arange(h.shape[0], device=h.device), select]  # [B, dim]
        return self.output(self.norm(h)).float()
