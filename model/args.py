from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A params.json (or flag) problem the user can fix; the message says what to change."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's text, else its type's name: for one-line error messages."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    sliding_window: int | None = None
    rope_theta: float | None = None
    moe: MoeArgs | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"params.json: '{name}' must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"params.json: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"params.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"params.json: sliding_window must be >= 1 or absent, got {self.sliding_window}")
        if self.moe is not None and not 1 <= self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ConfigError("params.json: moe.num_experts_per_tok must be between 1 and moe.num_experts")

    @property
    def theta(self) -> float:
        # Mistral 7B v0.1's params.json has no rope_theta and means 10000; Mixtral (no window) means 1e6.
        if self.rope_theta is not None:
            return self.rope_theta
        return 10000.0 if self.sliding_window is not None else 1e6

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = (
                {"num_experts": value.num_experts, "num_experts_per_tok": value.num_experts_per_tok}
                if f.name == "moe"
                else value
            )
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: str = "params.json") -> ModelArgs:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        ints = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")
        kw: dict[str, Any] = {}
        missing = [k for k in (*ints, "norm_eps") if k not in raw]
        if "head_dim" in missing and "dim" in raw and "n_heads" in raw:
            missing.remove("head_dim")  # older files omit it: dim // n_heads
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
        for k in ints:
            if k == "head_dim" and "head_dim" not in raw:
                kw[k] = _int(raw, "dim", source) // _int(raw, "n_heads", source)
            else:
                kw[k] = _int(raw, k, source)
        kw["norm_eps"] = _float(raw, "norm_eps", source)
        if raw.get("sliding_window") is not None:
            kw["sliding_window"] = _int(raw, "sliding_window", source)
        if raw.get("rope_theta") is not None:
            kw["rope_theta"] = _float(raw, "rope_theta", source)
        moe = raw.get("moe")
        if moe is not None:
            if not isinstance(moe, dict) or "num_experts" not in moe or "num_experts_per_tok" not in moe:
                raise ConfigError(f"{source}: 'moe' must be an object with num_experts and num_experts_per_tok")
            kw["moe"] = MoeArgs(_int(moe, "num_experts", source), _int(moe, "num_experts_per_tok", source))
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model directory needs params.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))


def _int(raw: dict[str, Any], key: str, source: str) -> int:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{source}: '{key}' must be an integer, got {v!r}")
    return v


def _float(raw: dict[str, Any], key: str, source: str) -> float:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{source}: '{key}' must be a number, got {v!r}")
    return float(v)
