"""Hugging Face directories: config.json + model.safetensors or sharded model-*.safetensors with
model.safetensors.index.json; tokenizer.json. MistralForCausalLM, MixtralForCausalLM and
LlamaForCausalLM (Llama is Mistral without a window)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from model.args import ConfigError, ModelArgs
from model.formats.files import TensorFile
from model.tokenizer import SentencePieceTokenizer, Tokenizer, find_tokenizer_file


def unpermute_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection (or of a LoRA B for it) from HF's rotate-half layout, per head
    (0..D/2-1 | D/2..D-1), back to interleaved pairs (0,1),(2,3),... as the engine rotates them:
    HF row j < D/2 is engine row 2j, HF row D/2 + j is engine row 2j + 1."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral", "LlamaForCausalLM": "llama"}
# Tensors some exporters write that carry no weights the engine needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def args_from_config(cfg: dict[str, Any], where: str) -> tuple[ModelArgs, bool]:
    """ModelArgs and tie_word_embeddings from a config.json; refuses in one line (naming the
    field) whatever the engine cannot run exactly."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    family = SUPPORTED.get(str(arch)) if arch else {"mistral": "mistral", "mixtral": "mixtral", "llama": "llama"}.get(
        str(cfg.get("model_type"))
    )
    if family is None:
        what = f"architecture {arch}" if arch else f"model_type {cfg.get('model_type')!r}"
        raise ConfigError(f"{where}: {what} is not supported; supported: {', '.join(SUPPORTED)}")

    def refuse(field: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: '{field}' {why}; the engine runs only models it can run exactly")

    rp = cfg.get("rope_parameters")
    rope: dict[str, Any] = rp if isinstance(rp, dict) else {}
    for field, value in (("rope_scaling", cfg.get("rope_scaling")), ("rope_parameters", rp)):
        if isinstance(value, dict):
            rtype = value.get("rope_type", value.get("type"))
            if rtype not in (None, "default"):
                raise refuse(f"{field}.rope_type", f"is {rtype!r} (only the default rotary embedding is supported)")
        elif value is not None:
            raise refuse(field, f"is {value!r}, expected an object or null")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise refuse(field, "is true (biases in the projections are not supported)")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise refuse("hidden_act", f"is {act!r} (only silu is supported)")
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        theta = 1e6 if family == "mixtral" else 10000.0
    window = cfg.get("sliding_window") if family != "llama" and cfg.get("use_sliding_window", True) else None
    params: dict[str, Any] = {
        "dim": cfg.get("hidden_size"),
        "n_layers": cfg.get("num_hidden_layers"),
        "hidden_dim": cfg.get("intermediate_size"),
        "n_heads": cfg.get("num_attention_heads"),
        "n_kv_heads": cfg.get("num_key_value_heads") or cfg.get("num_attention_heads"),
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "vocab_size": cfg.get("vocab_size"),
        "rope_theta": theta,
        "sliding_window": window,
    }
    for k, hf in (("dim", "hidden_size"), ("n_layers", "num_hidden_layers"), ("hidden_dim", "intermediate_size"),
                  ("n_heads", "num_attention_heads"), ("vocab_size", "vocab_size")):
        if params[k] is None:
            raise ConfigError(f"{where}: missing key {hf}")
    if cfg.get("head_dim") is not None:
        params["head_dim"] = cfg["head_dim"]
    if family == "mixtral":
        n_exp, per_tok = cfg.get("num_local_experts"), cfg.get("num_experts_per_tok")
        if n_exp is None or per_tok is None:
            raise ConfigError(f"{where}: a Mixtral config needs num_local_experts and num_experts_per_tok")
        params["moe"] = {"num_experts": n_exp, "num_experts_per_tok": per_tok}
    tied = bool(cfg.get("tie_word_embeddings", False))
    return ModelArgs.from_dict(params, source=where), tied


class HFSource:
    kind = "hf"

    def __init__(self, path: Path) -> None:
        self.path = path
        cfg_path = path / "config.json"
        self.where = str(cfg_path)
        cfg = read_config(cfg_path)
        self.args, self.tied = args_from_config(cfg, self.where)
        # transformers runs a model in its config's dtype by default; so does the engine.
        self.default_dtype = HF_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))
        self._shard_of = self._weight_map()  # HF name -> shard file
        self._files: dict[Path, TensorFile] = {}  # opened on first use: a rank opens only its shards
        self._map = self._engine_names()  # engine name -> (HF name, transform)
        self.names = set(self._map)

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            raw = read_config(index).get("weight_map")
            if not isinstance(raw, dict) or not raw:
                raise ConfigError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file")
            out = {name: self.path / str(f) for name, f in raw.items()}
            for f in sorted(set(out.values())):
                if not f.is_file():
                    raise ConfigError(f"{index} names shard {f.name}, which is missing from {self.path}")
            return out
        if single.is_file():
            return dict.fromkeys(TensorFile(single).names, single)
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise ConfigError(
                f"{self.path} holds PyTorch pickle weights (.bin), not safetensors; convert them, e.g. with "
                "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
            )
        raise ConfigError(f"no weights in {self.path}: expected model.safetensors or model.safetensors.index.json")

    def _engine_names(self) -> dict[str, tuple[str, Transform]]:
        a = self.args
        out: dict[str, tuple[str, Transform]] = {}
        unknown: list[str] = []
        for hf in self._shard_of:
            if hf.endswith(IGNORED_SUFFIXES):
                continue
            m = _LAYER.fullmatch(hf)
            if hf == "model.embed_tokens.weight":
                out["tok_embeddings.weight"] = (hf, None)
                if self.tied:
                    out["output.weight"] = (hf, None)
            elif hf == "model.norm.weight":
                out["norm.weight"] = (hf, None)
            elif hf == "lm_head.weight":
                if not self.tied:
                    out["output.weight"] = (hf, None)
            elif m is None:
                unknown.append(hf)
            elif m["rest"].endswith(".bias"):
                raise ConfigError(f"{self.where}: tensor {hf} is a bias; projections with biases are not supported")
            elif m["rest"] == "mlp.experts.gate_up_proj":  # transformers 5's fused experts [E, 2*hidden, dim]
                for e in range(a.moe.num_experts if a.moe else 0):
                    for part, w in ((0, "w1"), (1, "w3")):
                        out[f"layers.{m['i']}.feed_forward.experts.{e}.{w}.weight"] = (hf, ("expert", e, part))
            elif m["rest"] == "mlp.experts.down_proj":  # [E, dim, hidden]
                for e in range(a.moe.num_experts if a.moe else 0):
                    out[f"layers.{m['i']}.feed_forward.experts.{e}.w2.weight"] = (hf, ("expert", e, -1))
            else:
                rest: str | None = _RENAME.get(m["rest"])
                if rest is None:
                    em = _EXPERT.fullmatch(m["rest"])
                    if em is None:
                        unknown.append(hf)
                        continue
                    rest = f"feed_forward.experts.{em['e']}.{em['w']}.weight"
                transform: Transform = None
                if rest == "attention.wq.weight":
                    transform = ("rope", a.n_heads, 0)
                elif rest == "attention.wk.weight":
                    transform = ("rope", a.n_kv_heads, 0)
                out[f"layers.{m['i']}.{rest}"] = (hf, transform)
        if unknown:
            raise ConfigError(
                f"{self._shard_of[unknown[0]]}: unexpected tensor {unknown[0]} ({len(unknown)} in all) for "
                f"{self.where}'s architecture"
            )
        return out

    def _file(self, hf: str) -> TensorFile:
        f = self._shard_of[hf]
        if f not in self._files:
            self._files[f] = TensorFile(f)
        tf = self._files[f]
        if hf not in tf.names:
            raise ConfigError(f"{f} has no tensor {hf}, though the index says it does; re-download that shard")
        return tf

    def shape(self, name: str) -> tuple[int, ...]:
        hf, transform = self._map[name]
        s = self._file(hf).shape(hf)
        if transform is not None and transform[0] == "expert":
            _, _, part = transform
            s = s[1:]
            if part >= 0:
                s = (s[0] // 2, *s[1:])
        return tuple(s)

    def get(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        hf, transform = self._map[name]
        t = self._file(hf).get(hf, dtype)
        if transform is None:
            return t
        if transform[0] == "rope":
            return unpermute_rotate_half(t, int(transform[1]), self.args.head_dim).contiguous()
        _, e, part = transform
        t = t[int(e)]
        if part >= 0:
            half = t.shape[0] // 2
            t = t[half * int(part) : half * (int(part) + 1)]
        return t.clone()  # its own memory, not a view of the whole stacked tensor

    def tokenizer(self) -> Tokenizer:
        if (self.path / "tokenizer.json").is_file():
            return Tokenizer.from_dir(self.path)
        if any((self.path / n).is_file() for n in ("tokenizer.model",)):
            return SentencePieceTokenizer(find_tokenizer_file(self.path))
        raise ConfigError(f"no tokenizer in {self.path}: expected tokenizer.json (or tokenizer.model)")


Transform = tuple[str, int, int] | None  # ("rope", heads, 0) or ("expert", e, part: 0 w1, 1 w3, -1 w2)

_LAYER = re.compile(r"model\.layers\.(?P<i>\d+)\.(?P<rest>.+)")
_EXPERT = re.compile(r"block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight")
_RENAME = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "block_sparse_moe.gate.weight": "feed_forward.gate.weight",
    "mlp.gate.weight": "feed_forward.gate.weight",
}


# -- writing (random-weights test and benchmark models) -----------------------------------------

_TO_HF = {v: k for k, v in _RENAME.items() if not k.startswith("mlp.gate.")}


def hf_name(name: str, args: ModelArgs) -> str:
    """The HF (legacy on-disk) name of an engine tensor name."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    if rest.startswith("feed_forward.experts."):
        return f"model.layers.{i}.block_sparse_moe.{rest.removeprefix('feed_forward.')}"
    if rest == "feed_forward.gate.weight":
        return f"model.layers.{i}.block_sparse_moe.gate.weight"
    return f"model.layers.{i}.{_TO_HF[rest]}"


def write_hf_dir(
    out: Path,
    args: ModelArgs,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    tensors: Iterator[tuple[str, torch.Tensor]],
    shard_bytes: int = 5 << 30,
) -> None:
    """Stream engine-named tensors into an HF directory: config.json, model-0000i-of-0000n.safetensors
    of at most shard_bytes each, and the index, with q/k in HF's rotate-half layout."""
    from model.checkpoint import write_safetensors

    size = torch.tensor([], dtype=dtype).element_size()
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        if shards[-1] and used + n > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used += n
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    it = iter(tensors)
    for fname, shard in zip(files, shards, strict=True):

        def converted(names: dict[str, tuple[int, ...]] = shard) -> Iterator[tuple[str, torch.Tensor]]:
            for _ in names:
                name, t = next(it)
                if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                    heads = args.n_heads if ".wq." in name else args.n_kv_heads
                    d = args.head_dim
                    t = t.reshape(heads, d // 2, 2, -1).transpose(1, 2).reshape(heads * d, -1)
                yield hf_name(name, args), t

        hf_shapes = {hf_name(k, args): v for k, v in shard.items()}
        write_safetensors(out / fname, hf_shapes, dtype, converted())
        weight_map.update(dict.fromkeys(hf_shapes, fname))
    total = sum(math.prod(s) for s in shapes.values()) * size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n")


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if args.moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.moe else "mistral",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size, "rope_theta": args.theta,
        "sliding_window": args.sliding_window, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.moe:
        cfg["num_local_experts"], cfg["num_experts_per_tok"] = args.moe.num_experts, args.moe.num_experts_per_tok
    return cfg
