"""Checkpoint sources: one module per on-disk format, each answering "params" and "this tensor,
by engine name".

    source = open_source(path)        # a native dir, an HF dir or a .gguf file: detected, never flagged
    source.args                       # ModelArgs
    source.names                      # engine names it can give (tok_embeddings.weight, ...)
    source.get(name, dtype)           # that tensor in the engine's layout ([out, in], interleaved rotary pairs)
    source.tokenizer()                # model.tokenizer.Tokenizer

A source reads a tensor only when asked, so a rank that asks only for its own stage's names reads
only those bytes (and opens only the shard files that hold them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from model.args import ConfigError, ModelArgs

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer


class Source(Protocol):
    path: Path
    args: ModelArgs
    names: set[str]
    kind: str  # "native", "hf" or "gguf", for messages
    # The run dtype when --dtype is not given (None: each tensor's stored dtype): HF's config.json
    # dtype / torch_dtype, float32 for GGUF (dequantized values kept exact).
    default_dtype: torch.dtype | None

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor in its own memory (never a view of a file), converted to dtype if given
        (None: as stored; quantized GGUF tensors come out as float32)."""
        ...

    def tokenizer(self) -> Tokenizer: ...


def detect_format(path: Path) -> str:
    """'native', 'hf' or 'gguf' for a model path, or a one-line ConfigError saying what is missing."""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix.lower() == ".gguf":
            return "gguf"
        raise ConfigError(f"{path} is a file but not a GGUF file; give a model directory or a .gguf file")
    if not path.exists():
        raise ConfigError(f"model {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"model {path} is neither a directory nor a file")
    if (path / "params.json").is_file():
        return "native"
    if (path / "config.json").is_file():
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    hint = f" (it holds {len(ggufs)} .gguf files: name one)" if ggufs else ""
    raise ConfigError(
        f"{path} is not a model: expected params.json (Mistral native), config.json (Hugging Face) "
        f"or a .gguf file{hint}"
    )


def open_source(path: str | Path) -> Source:
    """Open a model by what it is on disk. Reads only metadata; tensors are read on demand."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "native":
        from model.formats.native import NativeSource

        return NativeSource(path)
    if fmt == "hf":
        from model.formats.hf import HFSource

        return HFSource(path)
    from model.formats.gguf import GGUFSource

    if path.is_dir():
        path = next(iter(sorted(path.glob("*.gguf"))))
    return GGUFSource(path)
