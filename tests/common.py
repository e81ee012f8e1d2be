"""Shared helpers for tests: tiny configs and random checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from model.args import ModelArgs
from model.checkpoint import expected_shapes, save_checkpoint
from model.tokenizer import DEFAULT_TOKENIZER_PATH
from model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = dict(dim=64, n_layers=4, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2,
                            norm_eps=1e-5, vocab_size=512)
CONFIGS: dict[str, dict[str, Any]] = {
    # window 8, shorter than the prompts; GQA (4 heads, 2 kv heads)
    "dense": dict(BASE, sliding_window=8),
    "moe": dict(BASE, sliding_window=8, rope_theta=1e6, moe=dict(num_experts=4, num_experts_per_tok=2)),
    # no window: rope_theta defaults to 1e6; head_dim != dim // n_heads
    "moe_nowindow": dict(BASE, head_dim=24, moe=dict(num_experts=4, num_experts_per_tok=2)),
}


def random_state(params: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with unit-scale activations (peaked, non-degenerate logits)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(ModelArgs.from_dict(params)).items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name == "tok_embeddings.weight":
            out[name] = torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return out


def write_model(path: Path, params: dict[str, Any], seed: int = 0, fmt: str = "safetensors",
                dtype: torch.dtype = torch.float32) -> Path:
    state = {k: v.to(dtype) for k, v in random_state(params, seed).items()}
    return save_checkpoint(path, ModelArgs.from_dict(params), state, fmt=fmt, tokenizer=DEFAULT_TOKENIZER_PATH)


def prompts(n: int = 3, lengths: tuple[int, ...] = (5, 19, 33), seed: int = 1, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for length in lengths[:n]]


def random_model(name: str, dtype: torch.dtype = torch.float32) -> Transformer:
    """The whole model of CONFIGS[name] with random_state's weights, in dtype, for inference."""
    model = Transformer(ModelArgs.from_dict(CONFIGS[name]))
    model.load_state_dict(random_state(CONFIGS[name]))
    return model.to(dtype).eval()


def chunked_logits(model: Transformer, tokens: list[int], chunk: int) -> torch.Tensor:
    """All-position logits [T, V], prefilled in chunks, then one decode step per remaining token."""
    cache = model.make_cache(1, 64)
    outs = []
    with torch.inference_mode():
        for s in range(0, len(tokens), chunk):
            ids = torch.tensor([tokens[s : s + chunk]])
            outs.append(model(ids, torch.arange(s, s + ids.shape[1])[None], cache)[0])
    return torch.cat(outs)
