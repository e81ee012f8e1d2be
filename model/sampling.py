from __future__ import annotations

from dataclasses import dataclass

import torch

# Odd 64-bit constants (splitmix64's) to mix (seed, sequence, step) into one generator seed.
_MIX_A, _MIX_B, _MASK = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, (1 << 63) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")


def _draw_seed(seed: int, sequence: int, step: int) -> int:
    return ((seed * _MIX_A) ^ (sequence * _MIX_B) ^ (step * _MIX_A * _MIX_B)) & _MASK


def sample(logits: torch.Tensor, params: SamplingParams, sequences: list[int], steps: list[int]) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B].

    The random draw for a sequence depends only on (seed, its index in the request, how many
    tokens it has generated), never on how the batch was cut into micro-batches or stages, so
    seeded sampling gives the same tokens for any P and M.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [B, V]
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    noise = torch.empty_like(probs)
    for row, (seq, step) in enumerate(zip(sequences, steps, strict=True)):
        gen = torch.Generator(device=probs.device).manual_seed(_draw_seed(params.seed, seq, step))
        noise[row].exponential_(generator=gen)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race); 0-probability tokens lose.
    return (probs / noise).argmax(dim=-1)
