from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

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
        self._compiled_step: Callable[..., torch.Tensor] | None = None  # set by compile_decode()
        self.compile_seconds = 0.0  # time spent in steps that compiled a new graph

    @property
    def is_first(self) -> bool:
        return self.tok_embeddings is not None

    @property
    def is_last(self) -> bool:
        return self.output is not None

    def make_cache(self, batch_size: int, capacity: int) -> RollingCache:
        p = next(self.parameters())
        if self._compiled_step is not None:
            capacity = compile_bucket(capacity, self.args.sliding_window)
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

    def compile_decode(self) -> None:
        """Run single-token steps (decode) through torch.compile (inductor): one graph per (batch rows,
        cache capacity), with capacities rounded up to a few buckets (compile_bucket) so that
        requests of different lengths share graphs. Prefill chunks stay eager. Tokens are the same
        as eager's (tests/test_decode_speed.py)."""
        import torch._inductor.config as inductor_config

        # Round every intermediate to the model dtype as eager does (bf16): the same tokens, not
        # merely close ones. It costs nothing measurable here; fp32 is unaffected.
        inductor_config.emulate_precision_casts = True
        self._compiled_step = torch.compile(self._step, dynamic=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: token ids [B, T] on the first stage, else activations [B, T, dim].
        positions [B, T]: absolute positions, -1 for padding. Then the cache, and optionally
        rows: the cache rows of this batch; select [B]: on the last stage, the index in T whose
        logits to return ([B, vocab]); without it the last stage returns logits for every token
        [B, T, vocab]. Other stages return activations [B, T, dim]."""
        if self._compiled_step is None or positions.shape[1] != 1:
            return self._step(x, positions, *args, **kwargs)
        from torch._dynamo.utils import counters

        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        out = self._compiled_step(x, positions, *args, **kwargs)
        if counters["stats"]["unique_graphs"] != graphs:  # this call compiled: count it once
            self.compile_seconds += time.perf_counter() - t0
        return out

    def _step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: RollingCache,
        rows: slice | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx = cache.step(slice(None) if rows is None else rows, positions)
        # Compiled steps take the rotations as real (cos, sin) pairs: inductor has no complex codegen.
        real = torch.compiler.is_compiling()
        ctx.rope = rope_tables(positions, self.args.head_dim, self.args.theta, real=real)
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for i in self.layer_ids:
            h = self.layers[str(i)](h, i, ctx, self.attention)
        ctx.commit()
        if self.norm is None or self.output is None:
            return h
        if select is not None:
            h = h[torch.arange(h.shape[0], device=h.device), select]  # [B, dim]
        return self.output(self.norm(h)).float()


def compile_bucket(capacity: int, sliding_window: int | None) -> int:
    """Cache capacity for compiled steps: the next power of two (at least 64), capped at the window.
    Any W >= the longest sequence (or W = the window) is a valid rolling cache (model/cache.py),
    so rounding up changes memory, never tokens, and bounds the shapes a compiled step sees."""
    bucket = max(64, 1 << (capacity - 1).bit_length())
    return bucket if sliding_window is None else max(capacity, min(bucket, sliding_window))
