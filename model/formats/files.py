"""Tensor-at-a-time reading of safetensors and .pth files, shared by the formats that use them."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

import torch

from model.args import ConfigError, first_line

ST_TO_TORCH = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


class TensorFile:
    """Tensor-at-a-time access to either weights format.

    safetensors are read with plain file reads into fresh (anonymous) memory rather than through
    an mmap: mapped file pages would count in this rank's RSS on top of the copy, use 4 KiB pages
    (TLB misses in every decode step), and vanish from memory under pressure, to be re-read from
    disk in the middle of decoding. A .pth is opened with torch.load(mmap=True, weights_only=True)
    and each tensor copied out; its mapping is dropped when the load ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sd: dict[str, torch.Tensor] | None = None
        if path.suffix == ".safetensors":
            self._index = self._read_header(path)
            self.names = list(self._index)
            return
        try:
            sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(
                f"refused to load {path}: it holds pickled code or objects, not just tensors "
                f"({first_line(e)}); convert it to safetensors from a trusted copy"
            ) from None
        except Exception as e:
            raise ConfigError(f"{path} is corrupt or truncated ({first_line(e)})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConfigError(f"{path} must hold a flat dict of tensor name -> tensor")
        self._sd, self.names = sd, list(sd)

    @staticmethod
    def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        """name -> (dtype, shape, absolute start, end) from the safetensors header, all checked."""
        bad = f"{path} is corrupt or truncated"
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConfigError(f"{bad} (shorter than its 8-byte header length); re-copy or re-create it")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ConfigError(f"{bad} (header length {n} does not fit the file); re-copy or re-create it")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{bad} (header is not JSON: {e}); re-copy or re-create it") from None
        if not isinstance(header, dict):
            raise ConfigError(f"{bad} (header is not a JSON object)")
        index = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = ST_TO_TORCH[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{bad} (entry {name!r} of its header is malformed)") from None
            nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or 8 + n + end > size:
                raise ConfigError(f"{bad}: tensor {name} lies outside the file; re-copy or re-create it")
            index[name] = (dtype, shape, 8 + n + begin, 8 + n + end)
        return index

    def shape(self, name: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[name].shape)
        return self._index[name][1]

    def get(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """A tensor in its own memory (never a view of the file), converted to dtype if given."""
        if self._sd is not None:
            t = self._sd[name]
            return t.to(dtype or t.dtype, copy=True)
        src_dtype, shape, begin, end = self._index[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(begin)
            if f.readinto(buf.numpy().data) != end - begin:
                raise ConfigError(f"{self.path}: tensor {name} is cut short; the file is truncated")
        t = buf.view(src_dtype).reshape(shape)
        return t if dtype is None or dtype == src_dtype else t.to(dtype)
