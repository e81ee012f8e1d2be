"""LoRA adapters merged into the base weights at load: W' = W + scale * B @ A, per stage.

Two layouts are read:
  - a PEFT adapter directory: adapter_config.json + adapter_model.safetensors (or .bin), keys
    `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` in Hugging Face's layout
    (q/k rows in rotate-half order), scaling lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA);
  - Mistral's lora.safetensors (the file, or a directory holding it): keys
    `layers.{i}.attention.wq.lora_A.weight` in the engine's own layout, scaling given by the caller.

fan_in_fan_out needs nothing here: it describes how the *base* layer stores its weight (GPT-2's
Conv1D, [in, out]); A [r, in] and B [out, r] are stored alike either way, and the engine's weights
are always [out, in], so the delta is B @ A (PEFT itself turns the flag off for nn.Linear).

Only metadata is read at load (the config and the safetensors header); a layer's A and B are read
when delta() asks for them, so each rank reads only its own stage's part of the adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.args import ConfigError, ModelArgs
from model.formats.files import TensorFile
from model.formats.hf import unpermute_rotate_half

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MISTRAL_WEIGHTS = "lora.safetensors"
SUPPORTED = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (and Mixtral's experts w1, w2, w3)"

# HF module path suffix (after layers.{i}.) -> engine module; experts keep their index.
HF_MODULES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "block_sparse_moe.gate": "feed_forward.gate",
}
HF_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])")
NATIVE_MODULE = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.(w[123]|gate|experts\.\d+\.w[123]))")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
# `<module>.lora_A.weight`, also with an adapter name (`.lora_A.default.weight`) or no `.weight`.
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>(?!weight$)[^.]+))?(?:\.weight)?$")


@dataclass(frozen=True)
class Pair:
    """One adapted weight: where its A and B lie, its scaling and the q/k row permutation it needs."""

    module: str  # the module path as the adapter names it, for messages
    a: str
    b: str
    scaling: float
    rank: float | None  # the rank adapter_config.json implies (None: Mistral format, any)
    permute_heads: int = 0  # > 0: B rows are in HF's rotate-half layout for this many heads


class LoraAdapter:
    def __init__(self, where: str, file: TensorFile, targets: dict[str, Pair], unsupported: list[str]) -> None:
        self.where = where
        self._file = file
        self._targets = targets  # engine weight name -> its pair
        self._unsupported = unsupported  # adapter modules the engine cannot merge into

    @classmethod
    def load(cls, path: Path, args: ModelArgs, scale: float) -> LoraAdapter:
        """Open a PEFT adapter directory or Mistral's lora.safetensors (file or its directory)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"LoRA adapter {path} does not exist")
        if path.is_dir() and not (path / PEFT_CONFIG).is_file():
            if (path / MISTRAL_WEIGHTS).is_file():
                path = path / MISTRAL_WEIGHTS
            elif any((path / w).is_file() for w in PEFT_WEIGHTS):
                raise ConfigError(
                    f"LoRA adapter {path} has no {PEFT_CONFIG}: copy it beside the weights "
                    "(PEFT's save_pretrained writes both)"
                )
            else:
                raise ConfigError(
                    f"{path} is not a LoRA adapter: expected {PEFT_CONFIG} + {PEFT_WEIGHTS[0]} (PEFT) "
                    f"or {MISTRAL_WEIGHTS} (Mistral)"
                )
        if path.is_dir():
            return cls._load_peft(path, args)
        if path.suffix != ".safetensors":
            raise ConfigError(f"LoRA adapter {path} is not a .safetensors file; give Mistral's {MISTRAL_WEIGHTS}")
        return cls._load_mistral(path, scale)

    @classmethod
    def _load_mistral(cls, path: Path, scale: float) -> LoraAdapter:
        file = TensorFile(path)
        targets: dict[str, Pair] = {}
        if any(n.startswith("base_model.") for n in file.names):
            raise ConfigError(
                f"{path} holds a PEFT adapter's weights: give its directory (with {PEFT_CONFIG}) as --lora"
            )
        pairs, unsupported = _pairs(file.names, str(path))
        for module, (a, b) in pairs.items():
            if NATIVE_MODULE.fullmatch(module) is None:
                unsupported.append(module)
                continue
            targets[module + ".weight"] = Pair(module, a, b, scale, None)
        return cls(str(path), file, targets, unsupported)

    @classmethod
    def _load_peft(cls, path: Path, args: ModelArgs) -> LoraAdapter:
        where = str(path / PEFT_CONFIG)
        try:
            cfg = json.loads((path / PEFT_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        _check_features(cfg, where)
        weights = next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise ConfigError(f"LoRA adapter {path} has {PEFT_CONFIG} but no {PEFT_WEIGHTS[0]} beside it")
        file = TensorFile(weights)
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        targets: dict[str, Pair] = {}
        pairs, unsupported = _pairs(file.names, str(weights))
        for module, (a, b) in pairs.items():
            if not _targeted(cfg, module):
                continue  # PEFT builds no LoRA layer here, so it would ignore these weights too
            engine = _hf_to_engine(module)
            if engine is None:
                unsupported.append(module)
                continue
            # Per-module rank and alpha: PEFT matches pattern keys against the module's full path.
            mr = _pattern(rank_pattern, module, r)
            ma = _pattern(alpha_pattern, module, alpha)
            scaling = ma / math.sqrt(mr) if cfg.get("use_rslora") else ma / mr
            heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(engine.split(".", 2)[-1], 0)
            targets[engine + ".weight"] = Pair(module, a, b, scaling, mr, heads)
        return cls(str(weights), file, targets, unsupported)

    def check(self, args: ModelArgs, names: Iterable[str]) -> None:
        """Every adapted weight must exist in this model with A [r, in] and B [out, r] fitting it.
        The whole adapter is checked (headers only), not just `names`, so that every rank of a
        pipeline reports the same problem."""
        from model.checkpoint import expected_shapes

        if self._unsupported:
            m, n = self._unsupported[0], len(set(self._unsupported))
            raise ConfigError(
                f"LoRA adapter {self.where} targets {m} ({n} module(s) in all), which this "
                f"engine cannot merge: LoRA is supported on {SUPPORTED}; retrain with target_modules among those"
            )
        if not self._targets:
            raise ConfigError(f"LoRA adapter {self.where} holds no LoRA weights for this model's layers")
        want = expected_shapes(args)
        for name, p in self._targets.items():
            if name not in want:
                raise ConfigError(
                    f"LoRA adapter {self.where} targets {p.module}, which this model does not have "
                    f"({args.n_layers} layers, {'MoE' if args.moe else 'dense'}): "
                    "is it an adapter for another base model?"
                )
            a, b = self._file.shape(p.a), self._file.shape(p.b)
            out, inp = want[name]
            rank = a[0] if len(a) == 2 else -1
            if len(a) != 2 or len(b) != 2 or a[1] != inp or b[0] != out or b[1] != rank:
                raise ConfigError(
                    f"LoRA adapter {self.where}: {p.module} has A {list(a)} and B {list(b)}, but this model's "
                    f"{name} is {[out, inp]} (A must be [r, {inp}], B [{out}, r]): "
                    "the adapter was trained for another base model"
                )
            if p.rank is not None and rank != p.rank:
                raise ConfigError(
                    f"LoRA adapter {self.where}: {p.module} has rank {rank} but adapter_config.json implies "
                    f"r={p.rank:g} (r / rank_pattern): the config does not belong to these weights"
                )

    def delta(self, name: str) -> torch.Tensor | None:
        """scale * B @ A in fp32 and the engine's layout for an engine weight name; None if not adapted."""
        p = self._targets.get(name)
        if p is None:
            return None
        a = self._file.get(p.a, torch.float32)
        b = self._file.get(p.b, torch.float32)
        if p.permute_heads:
            # (B A) rows = B rows: permuting B's rows before the product is the same and cheaper.
            b = unpermute_rotate_half(b, p.permute_heads, b.shape[0] // p.permute_heads)
        return (b @ a).mul_(p.scaling)


def _check_features(cfg: dict[str, Any], where: str) -> None:
    """Refuse what a plain W + s * B A merge cannot reproduce, naming what to change."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConfigError(f"{where}: peft_type {peft_type} is not supported; only LoRA adapters can be merged")
    merge = "merge it in PEFT (merge_and_unload) and load the merged model instead"
    problems = [
        (cfg.get("use_dora"), f"use_dora (DoRA) is not supported; {merge}"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')!r} is not supported; train with bias='none'"),
        (cfg.get("lora_bias"), "lora_bias is not supported; train with lora_bias=False"),
        (cfg.get("modules_to_save"), f"modules_to_save is not supported (it replaces whole modules); {merge}"),
        (cfg.get("target_parameters"), f"target_parameters (e.g. fused MoE experts) is not supported; {merge}"),
        (cfg.get("layer_replication"), "layer_replication is not supported"),
        (cfg.get("trainable_token_indices"), "trainable_token_indices is not supported"),
        (cfg.get("alora_invocation_tokens"), "activated LoRA (alora_invocation_tokens) cannot be merged into weights"),
    ]
    for bad, msg in problems:
        if bad:
            raise ConfigError(f"{where}: {msg}")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{where}: {key} must be a positive number, got {v!r}")


def _pairs(names: Iterable[str], where: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """module -> (A key, B key), and the modules of any other tensor (embedding LoRA, the base
    weights PEFT saves beside an lm_head / embed_tokens adapter, DoRA magnitudes, biases): those
    change the model in a way a merge of B A does not, so check() refuses them by module name.
    Module names lose PEFT's `base_model.model.` prefix: they are then paths in the base model."""
    found: dict[str, dict[str, str]] = {}
    others: list[str] = []
    adapters: set[str] = set()
    for n in names:
        m = LORA_KEY.match(n)
        if m is None:
            module = re.split(r"\.(?:base_layer|lora_\w+|modules_to_save|original_module)\b", n)[0]
            others.append(module.removeprefix("base_model.model.").removesuffix(".weight").removesuffix(".bias"))
            continue
        found.setdefault(m["module"].removeprefix("base_model.model."), {})[m["ab"]] = n
        if m["adapter"]:
            adapters.add(m["adapter"])
    if len(adapters) > 1:
        raise ConfigError(f"LoRA adapter {where} holds several adapters ({', '.join(sorted(adapters))}); save one")
    for module, ab in found.items():
        if len(ab) != 2:
            only = next(iter(ab))
            raise ConfigError(f"LoRA adapter {where}: {module} has lora_{only} but no partner; the file is incomplete")
    return {module: (ab["A"], ab["B"]) for module, ab in found.items()}, others


def _targeted(cfg: dict[str, Any], module: str) -> bool:
    """PEFT's own rule (check_target_module_exists): a regex string is full-matched; list entries
    match the path or its last components, and only then does layers_to_transform filter."""
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if not any(module == t or module.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    m = LAYER.search(module)
    if m is None:
        return False
    return int(m[1]) == layers if isinstance(layers, int) else int(m[1]) in layers


def _pattern(patterns: dict[str, Any], module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def _hf_to_engine(module: str) -> str | None:
    """`model.layers.3.self_attn.q_proj` -> `layers.3.attention.wq`; None for modules the engine
    cannot merge into (lm_head, embed_tokens, anything of another architecture)."""
    m = LAYER.search(module)
    if m is None:
        return None
    i, rest = m[1], m[2]
    if rest in HF_MODULES:
        return f"layers.{i}.{HF_MODULES[rest]}"
    e = HF_EXPERT.fullmatch(rest)
    if e is not None:
        return f"layers.{i}.feed_forward.experts.{e[1]}.{e[2]}"
    return None
