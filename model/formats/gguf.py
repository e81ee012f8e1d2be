"""GGUF files (llama.cpp's format) of the llama architecture, which Llama, Mistral and Mixtral GGUFs use.

The file is read through gguf's memory-mapped GGUFReader: opening parses only the header, and get()
touches and dequantizes only the bytes of the tensor asked for (a stacked-expert tensor is sliced per
expert before dequantizing), so a rank reads only its own stage.

q/k need no permutation: llama.cpp's converter permutes Hugging Face's rotate-half rows into the
interleaved-pair layout the engine rotates (tests/test_gguf.py checks tokens against transformers).
What the engine cannot run exactly (rope scaling, biases, other architectures, ...) is refused at open
with a one-line ConfigError rather than giving subtly wrong tokens.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.args import ConfigError, ModelArgs, MoeArgs, first_line

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFReader, ReaderField, ReaderTensor

    from model.tokenizer import Tokenizer

_GLOBAL = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "ffn_gate_inp": "feed_forward.gate",
}
_EXPERT = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+?)(_exps)?(?:\.(\d+))?\.weight")
_MISSING = object()


class _UnknownType(Exception):
    def __init__(self, tensor: str, type_id: int) -> None:
        super().__init__(tensor, type_id)
        self.tensor, self.type_id = tensor, type_id


@functools.cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether the installed gguf package dequantizes this type (probed once on one zero block)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class GGUFSource:
    kind = "gguf"
    default_dtype: torch.dtype | None = torch.float32  # quantized tensors are dequantized: keep their values exact

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        if not self.path.is_file():
            raise ConfigError(f"GGUF file {self.path} does not exist")
        self._reader = self._open()
        self._fields = self._reader.fields
        self._by_name = {t.name: t for t in self._reader.tensors}
        self.args = self._read_args()
        # engine name -> (GGUF tensor, expert index into a stacked [E, out, in] tensor or None)
        self._map: dict[str, tuple[ReaderTensor, int | None]] = {}
        for t in self._reader.tensors:
            self._add(t)
        if "output.weight" not in self._map and "tok_embeddings.weight" in self._map:
            # Tied embeddings: the last stage reads the embedding again, into its own memory.
            self._map["output.weight"] = self._map["tok_embeddings.weight"]
        self.names = set(self._map)

    def _open(self) -> GGUFReader:
        import gguf

        known = {int(q) for q in gguf.GGMLQuantizationType}

        class Reader(gguf.GGUFReader):
            # Checks each tensor's type id before gguf turns an unknown one into a bare ValueError,
            # so the message can name the tensor.
            def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
                for f in fields:
                    if int(f.parts[4][0]) not in known:
                        raise _UnknownType(bytes(f.parts[1]).decode(errors="replace"), int(f.parts[4][0]))
                super()._build_tensors(start_offs, fields)

        bad = f"{self.where} is truncated or corrupt"
        try:
            reader = Reader(self.path, "r")
        except _UnknownType as e:
            raise ConfigError(
                f"{self.where}: tensor {e.tensor} has quantization type id {e.type_id}, unknown to the installed "
                f"gguf package; re-quantize it to a common type (Q8_0, Q4_K, ...) or upgrade gguf"
            ) from None
        except Exception as e:  # GGUFReader raises ValueError, IndexError, KeyError, ... on a bad file
            raise ConfigError(f"{bad} ({first_line(e)}); re-copy or re-create it") from None
        size = self.path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ConfigError(f"{bad}: tensor {t.name} lies outside the file; re-copy or re-create it")
            if not _can_dequantize(t.tensor_type):
                raise ConfigError(
                    f"{self.where}: tensor {t.name} is stored as {t.tensor_type.name}, which the installed gguf "
                    f"package cannot dequantize; re-quantize it to a common type (Q8_0, Q4_K, ...)"
                )
        if reader.byte_order != "I" or sys.byteorder != "little":
            # Quantized blocks hold little-endian fp16 scales that dequantize would misread.
            raise ConfigError(f"{self.where} is a big-endian GGUF file; convert it to little-endian")
        return reader

    def _meta(self, key: str, default: Any = _MISSING) -> Any:
        f = self._fields.get(key)
        if f is None:
            if default is _MISSING:
                raise ConfigError(f"{self.where}: metadata key {key} is missing")
            return default
        return f.contents()

    def _int(self, key: str, default: Any = _MISSING) -> int:
        v = self._meta(key, default)
        if isinstance(v, list):  # some files give a per-layer list; the engine needs one value
            if not v or len(set(v)) != 1:
                raise ConfigError(f"{self.where}: {key} differs between layers ({v[:8]}); the engine cannot run it")
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.where}: metadata {key} must be an integer, got {v!r}")
        return v

    def _read_args(self) -> ModelArgs:
        arch = self._meta("general.architecture")
        if arch != "llama":
            raise ConfigError(
                f"{self.where}: GGUF architecture {arch!r} is not supported; the engine runs the 'llama' "
                f"architecture (Llama, Mistral, Mixtral)"
            )
        p = "llama."
        dim, n_heads = self._int(p + "embedding_length"), self._int(p + "attention.head_count")
        head_dim = self._int(p + "attention.key_length", dim // max(n_heads, 1))
        for key in (p + "attention.value_length", p + "rope.dimension_count"):
            if self._int(key, head_dim) != head_dim:  # partial rotary or odd v heads: another model
                raise ConfigError(f"{self.where}: {key} is {self._int(key)}, not head_dim {head_dim}; unsupported")
        self._refuse_rope_scaling(p)
        scale = self._meta(p + "attention.scale", None)
        if scale not in (None, 0.0) and not math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
            raise ConfigError(f"{self.where}: {p}attention.scale is {scale}, not 1/sqrt(head_dim); unsupported")
        if self._int(p + "expert_gating_func", 1) != 1:  # 1 = softmax, as Mixtral routes
            raise ConfigError(f"{self.where}: {p}expert_gating_func is not softmax; unsupported")
        moe = None
        if self._int(p + "expert_count", 0) > 0:
            moe = MoeArgs(self._int(p + "expert_count"), self._int(p + "expert_used_count"))
        hidden = self._int(p + "feed_forward_length")
        if moe is not None:
            hidden = self._int(p + "expert_feed_forward_length", hidden)
        emb = self._by_name.get("token_embd.weight")
        vocab = int(emb.shape[1]) if emb is not None else len(self._meta("tokenizer.ggml.tokens", []))
        try:
            # No sliding window: llama.cpp applies none for the llama architecture.
            return ModelArgs(
                dim=dim,
                n_layers=self._int(p + "block_count"),
                head_dim=head_dim,
                hidden_dim=hidden,
                n_heads=n_heads,
                n_kv_heads=self._int(p + "attention.head_count_kv", n_heads),
                norm_eps=float(self._meta(p + "attention.layer_norm_rms_epsilon")),
                vocab_size=vocab,
                rope_theta=float(self._meta(p + "rope.freq_base", 10000.0)),
                moe=moe,
            )
        except ConfigError as e:
            raise ConfigError(f"{self.where}: {str(e).removeprefix('params.json: ')}") from None

    def _refuse_rope_scaling(self, p: str) -> None:
        kind = self._meta(p + "rope.scaling.type", "none")
        for key in (p + "rope.scaling.factor", p + "rope.scale_linear"):
            factor = self._meta(key, None)
            if factor not in (None, 0.0, 1.0):  # llama.cpp scales linearly by any factor != 1 (0 = unset)
                raise ConfigError(f"{self.where}: {key} is {factor}; the engine has no rope scaling")
        if kind not in ("none", "linear"):
            raise ConfigError(f"{self.where}: {p}rope.scaling.type is {kind!r}; the engine has no rope scaling")
        if "rope_freqs.weight" in self._by_name:
            raise ConfigError(f"{self.where}: tensor rope_freqs.weight rescales rotary frequencies; unsupported")

    def _add(self, t: ReaderTensor) -> None:
        name = t.name
        if name.endswith(".bias"):
            raise ConfigError(f"{self.where}: tensor {name} is a bias; the engine's llama has none, unsupported")
        if name.endswith(".weight") and name[: -len(".weight")] in _GLOBAL:
            self._map[_GLOBAL[name[: -len(".weight")]] + ".weight"] = (t, None)
            return
        m = _BLOCK.fullmatch(name)
        if m is not None and m[3] is None and m[4] is None and m[2] in _LAYER:
            self._map[f"layers.{m[1]}.{_LAYER[m[2]]}.weight"] = (t, None)
            return
        if m is not None and m[3] is not None and m[4] is None and m[2] in _EXPERT and len(t.shape) == 3:
            for e in range(int(t.shape[2])):  # stacked [E, out, in]; ggml lists dims innermost first
                self._map[f"layers.{m[1]}.feed_forward.experts.{e}.{_EXPERT[m[2]]}.weight"] = (t, e)
            return
        if m is not None and m[3] is None and m[4] is not None and m[2] in _EXPERT:  # older per-expert names
            self._map[f"layers.{m[1]}.feed_forward.experts.{m[4]}.{_EXPERT[m[2]]}.weight"] = (t, None)
            return
        raise ConfigError(f"{self.where}: tensor {name} is not part of a llama model the engine can run")

    def shape(self, name: str) -> tuple[int, ...]:
        t, expert = self._map[name]
        dims = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml: innermost dimension first
        return dims if expert is None else dims[1:]

    def get(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        t, expert = self._map[name]
        raw = t.data if expert is None else t.data[expert]  # only this expert's bytes are touched
        if t.tensor_type in (Q.F32, Q.F16):
            out = torch.from_numpy(np.array(raw))  # a copy: never a view of the mapped file
        elif t.tensor_type == Q.BF16:
            out = torch.from_numpy(np.array(raw)).view(torch.bfloat16)
        else:
            out = torch.from_numpy(np.ascontiguousarray(dequantize(raw, t.tensor_type), dtype=np.float32))
        out = out.reshape(self.shape(name))
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def tokenizer(self) -> Tokenizer:
        from model.formats.gguf_vocab import gguf_tokenizer

        return gguf_tokenizer(self.path, reader=self._reader)  # parsing the metadata again costs seconds
