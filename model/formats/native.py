"""Mistral's native layout: params.json + consolidated.safetensors (or consolidated.00.pth) +
tokenizer.model. Tensor names on disk are the engine's names."""

from __future__ import annotations

from pathlib import Path

import torch

from model.args import ConfigError, ModelArgs
from model.formats.files import TensorFile
from model.tokenizer import SentencePieceTokenizer, Tokenizer, find_tokenizer_file

WEIGHT_FILES = ("consolidated.safetensors", "consolidated.00.pth")


def find_weights(model_dir: Path) -> Path:
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise ConfigError(f"no weights in {model_dir}: expected {' or '.join(WEIGHT_FILES)}")


class NativeSource:
    kind = "native"
    default_dtype: torch.dtype | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self.args = ModelArgs.from_json(path / "params.json")
        self._file = TensorFile(find_weights(path))
        self.names = set(self._file.names)
        self.where = str(self._file.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file.shape(name)

    def get(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        return self._file.get(name, dtype)

    def tokenizer(self) -> Tokenizer:
        if (self.path / "tokenizer.json").is_file():
            return Tokenizer.from_dir(self.path)
        return SentencePieceTokenizer(find_tokenizer_file(self.path))
