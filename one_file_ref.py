"""One-file reference for Mistral / Mixtral: readable, slow, float32, no KV cache.

Reads a Mistral-native model directory (params.json + consolidated.safetensors or consolidated.00.pth,
names as in docs/DESIGN.md) and runs greedy decoding by recomputing the whole sequence every step.
Needs only torch, safetensors and sentencepiece; it imports nothing from this project's packages, so
tests can check the pipeline engine against it.

    python -m one_file_ref <model_dir> --prompt "Hello" --max_tokens 20
    python -m one_file_ref <model_dir> --tokens 1,415,2936 --max_tokens 20

API:  model = load(model_dir);  model.logits(tokens) -> [T, vocab]
      forward_logits(model_dir_or_model, tokens) -> [T, vocab]
      generate(model_dir_or_model, prompts, max_tokens, eos_id=2) -> generated ids per prompt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class MissingFileError(FileNotFoundError):
    """A file the model directory must contain is not there (the CLI prints it on one line)."""


@dataclass
class Params:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    sliding_window: int | None  # None: plain causal attention
    rope_theta: float
    num_experts: int  # 0: dense feed-forward
    num_experts_per_tok: int


def load_params(model_dir: str) -> Params:
    path = os.path.join(model_dir, "params.json")
    if not os.path.isfile(path):
        raise MissingFileError(f"no params.json in {model_dir}")
    with open(path) as f:
        p = json.load(f)
    window = p.get("sliding_window")
    moe = p.get("moe") or {}
    return Params(
        dim=p["dim"],
        n_layers=p["n_layers"],
        head_dim=p.get("head_dim") or p["dim"] // p["n_heads"],
        hidden_dim=p["hidden_dim"],
        n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"],
        norm_eps=p["norm_eps"],
        vocab_size=p["vocab_size"],
        sliding_window=window,
        # Mistral 7B v0.1 has a window and no rope_theta (means 10000); Mixtral has neither (1e6).
        rope_theta=p.get("rope_theta") or (10000.0 if window is not None else 1e6),
        num_experts=moe.get("num_experts", 0),
        num_experts_per_tok=moe.get("num_experts_per_tok", 0),
    )


def load_weights(model_dir: str) -> dict[str, Tensor]:
    """All tensors by name, in their stored dtype (memory-mapped where possible)."""
    st_path = os.path.join(model_dir, "consolidated.safetensors")
    pth_path = os.path.join(model_dir, "consolidated.00.pth")
    if os.path.isfile(st_path):
        from safetensors.torch import load_file

        return load_file(st_path)
    if os.path.isfile(pth_path):
        return torch.load(pth_path, mmap=True, weights_only=True)
    raise MissingFileError(f"no consolidated.safetensors or consolidated.00.pth in {model_dir}")


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # x [T, dim], weight [dim]
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Interleaved-pair rotary: (x[2i], x[2i+1]) is rotated by angle pos * theta^(-2i/head_dim)."""
    # x [T, H, D], positions [T]
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # [D/2]
    angle = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # [T, 1, D/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [T, H, D/2] each
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # [T, H, D/2, 2]
    return out.flatten(-2)  # [T, H, D]


def attention_mask(T: int, sliding_window: int | None) -> Tensor:
    """[T, T] bool: query q may attend key k iff k <= q and k > q - sliding_window."""
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    return allowed


def swiglu(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    # x [N, dim]; w1, w3 [hidden, dim]; w2 [dim, hidden]
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


# ----------------------------------------------------------------------------- the model


class Model:
    def __init__(self, params: Params, weights: dict[str, Tensor]) -> None:
        self.params = params
        self.weights = weights

    def w(self, name: str) -> Tensor:
        """A weight as float32 ([out, in] for projections); kept in its stored dtype until used."""
        return self.weights[name].float()

    def attention(self, i: int, x: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        p, pre = self.params, f"layers.{i}.attention."
        T = x.shape[0]
        q = F.linear(x, self.w(pre + "wq.weight")).view(T, p.n_heads, p.head_dim)  # [T, H, D]
        k = F.linear(x, self.w(pre + "wk.weight")).view(T, p.n_kv_heads, p.head_dim)  # [T, Hkv, D]
        v = F.linear(x, self.w(pre + "wv.weight")).view(T, p.n_kv_heads, p.head_dim)  # [T, Hkv, D]
        q, k = rotary(q, positions, p.rope_theta), rotary(k, positions, p.rope_theta)
        # grouped-query attention: query head h reads kv head h // (H / Hkv)
        k = k.repeat_interleave(p.n_heads // p.n_kv_heads, dim=1)  # [T, H, D]
        v = v.repeat_interleave(p.n_heads // p.n_kv_heads, dim=1)  # [T, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(p.head_dim)  # [H, T, T]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)  # [H, T, T]
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, p.n_heads * p.head_dim)  # [T, H*D]
        return F.linear(out, self.w(pre + "wo.weight"))  # [T, dim]

    def feed_forward(self, i: int, x: Tensor) -> Tensor:
        p, pre = self.params, f"layers.{i}.feed_forward."
        if p.num_experts == 0:
            return swiglu(x, self.w(pre + "w1.weight"), self.w(pre + "w2.weight"), self.w(pre + "w3.weight"))
        # MoE: top-k of the router logits, softmax over those k, weighted sum of those k experts
        router_logits = F.linear(x, self.w(pre + "gate.weight"))  # [T, E]
        top_logits, top_experts = router_logits.topk(p.num_experts_per_tok, dim=-1)  # [T, k] each
        top_weights = top_logits.softmax(dim=-1)  # [T, k]
        out = torch.zeros_like(x)  # [T, dim]
        for e in range(p.num_experts):
            rows, slot = torch.where(top_experts == e)  # tokens routed to e, and in which of their k slots
            if rows.numel() == 0:
                continue
            ex = f"{pre}experts.{e}."
            y = swiglu(x[rows], self.w(ex + "w1.weight"), self.w(ex + "w2.weight"), self.w(ex + "w3.weight"))
            out.index_add_(0, rows, top_weights[rows, slot, None] * y)
        return out

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> Tensor:
        """Float32 logits [T, vocab] for every position of one sequence starting at position 0."""
        p = self.params
        T = len(tokens)
        positions = torch.arange(T)  # [T]
        mask = attention_mask(T, p.sliding_window)  # [T, T]
        h = self.w("tok_embeddings.weight")[torch.tensor(tokens, dtype=torch.long)]  # [T, dim]
        for i in range(p.n_layers):
            h = h + self.attention(i, rms_norm(h, self.w(f"layers.{i}.attention_norm.weight"), p.norm_eps),
                                   positions, mask)
            h = h + self.feed_forward(i, rms_norm(h, self.w(f"layers.{i}.ffn_norm.weight"), p.norm_eps))
        h = rms_norm(h, self.w("norm.weight"), p.norm_eps)  # [T, dim]
        return F.linear(h, self.w("output.weight"))  # [T, vocab]


def load(model_dir: str) -> Model:
    return Model(load_params(model_dir), load_weights(model_dir))


def forward_logits(model: str | Model, tokens: list[int]) -> Tensor:
    """Logits [T, vocab] for every position; `model` is a directory or a loaded Model."""
    m = load(model) if isinstance(model, str) else model
    return m.logits(tokens)


def generate(model: str | Model, prompts: list[list[int]], max_tokens: int,
             eos_id: int | None = 2) -> list[list[int]]:
    """Greedy decoding, one prompt at a time, recomputing the whole sequence at every step.

    Returns the generated ids per prompt: prompt excluded, stopping at eos (not included) or max_tokens.
    """
    m = load(model) if isinstance(model, str) else model
    results: list[list[int]] = []
    for prompt in prompts:
        seq, out = list(prompt), []
        for _ in range(max_tokens):
            next_id = int(m.logits(seq)[-1].argmax())
            if eos_id is not None and next_id == eos_id:
                break
            seq.append(next_id)
            out.append(next_id)
        results.append(out)
    return results


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m one_file_ref", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text; tokenised with <model_dir>/tokenizer.model, BOS (1) added")
    source.add_argument("--tokens", help="comma-separated prompt token ids, used as given")
    parser.add_argument("--max_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        if args.tokens is not None:
            try:
                ids = [int(t) for t in args.tokens.split(",") if t.strip()]
            except ValueError:
                parser.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
            print(",".join(str(t) for t in generate(load(args.model_dir), [ids], args.max_tokens)[0]))
            return 0
        tok_path = os.path.join(args.model_dir, "tokenizer.model")
        if not os.path.isfile(tok_path):
            raise MissingFileError(f"no tokenizer.model in {args.model_dir} (needed by --prompt)")
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=tok_path)
        ids = [1] + sp.encode(args.prompt)
        out = generate(load(args.model_dir), [ids], args.max_tokens, eos_id=sp.eos_id())[0]
        print(sp.decode(out))
        return 0
    except MissingFileError as e:
        print(f"one_file_ref: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
