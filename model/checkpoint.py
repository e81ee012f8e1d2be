"""Mistral-native checkpoints: params.json + consolidated.safetensors or consolidated.00.pth.

A process builds only its own modules on the meta device and reads only their tensors, one at a
time, so its peak memory is its share of the weights, never the whole model.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from model.args import ConfigError, ModelArgs
from model.transformer import Transformer

WEIGHT_FILES = ("consolidated.safetensors", "consolidated.00.pth")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROGRESS_MIN_BYTES = 256 << 20  # loads smaller than this are quiet


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name in ("", "auto"):
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def find_weights(model_dir: Path) -> Path:
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise ConfigError(f"no weights in {model_dir}: expected {' or '.join(WEIGHT_FILES)}")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        full = Transformer(args)
    return {k: tuple(v.shape) for k, v in full.state_dict().items()}


_ST_TO_TORCH = {
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


class _Reader:
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
                f"({_first_line(e)}); convert it to safetensors from a trusted copy"
            ) from None
        except Exception as e:
            raise ConfigError(f"{path} is corrupt or truncated ({_first_line(e)})") from None
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
                dtype = _ST_TO_TORCH[info["dtype"]]
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


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_stage(
    model_dir: str | Path,
    layers: Sequence[int] | None = None,
    first: bool = True,
    last: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> Transformer:
    """Build the modules of one stage (all of the model by default) and load their weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    args = ModelArgs.from_json(model_dir / "params.json")
    reader = _Reader(find_weights(model_dir))
    want = expected_shapes(args)
    unexpected = sorted(set(reader.names) - set(want))
    if unexpected:
        raise ConfigError(
            f"{reader.path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for the shapes in params.json"
        )
    with torch.device("meta"):
        model = Transformer(args, layers, first, last)
    names = list(model.state_dict())
    missing = [n for n in names if n not in reader.names]
    if missing:
        raise ConfigError(f"{reader.path}: tensor {missing[0]} is missing ({len(missing)} in all)")
    for n in names:
        if reader.shape(n) != want[n]:
            raise ConfigError(
                f"{reader.path}: tensor {n} has shape {list(reader.shape(n))}, params.json implies {list(want[n])}"
            )
    total = sum(math.prod(want[n]) for n in names)
    state: dict[str, torch.Tensor] = {}
    t0, last_report, done = time.monotonic(), 0.0, 0
    for i, n in enumerate(names):
        t = reader.get(n, dtype)
        state[n] = t.to(device=device)
        done += t.numel()
        now = time.monotonic()
        if (
            progress is not None
            and total * t.element_size() >= PROGRESS_MIN_BYTES
            and (now - last_report > 2 or i + 1 == len(names))
        ):
            last_report = now
            gb = total * t.element_size() / 1e9
            pct = 100 * done / total
            progress(f"loading {i + 1}/{len(names)} tensors, {pct:.0f}% of {gb:.1f} GB, {now - t0:.0f} s")
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) > 1:
        # Mixed files (e.g. fp32 norms in a bf16 checkpoint) run in the embedding's dtype.
        common = state[names[0]].dtype
        state = {k: v.to(common) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# -- writing ------------------------------------------------------------------------------------


def _random_tensors(args: ModelArgs, dtype: torch.dtype, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights with sane scales: unit-variance activations, norms at 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name == "tok_embeddings.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        yield name, t.to(dtype)


def write_safetensors(
    path: Path,
    names_shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """Stream tensors into a safetensors file without holding them all in memory."""
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in names_shapes.items():
        n = math.prod(shape) * size
        header[name] = {
            "dtype": next(k for k, v in _ST_TO_TORCH.items() if v == dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors:
            assert tuple(t.shape) == names_shapes[name]
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())  # numpy has no bfloat16


def save_checkpoint(
    out_dir: str | Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    fmt: str = "safetensors",
    tokenizer: str | Path | None = None,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "pth":
        torch.save({k: v.contiguous() for k, v in state.items()}, out / "consolidated.00.pth")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "consolidated.safetensors"))
    return _write_side_files(out, args, tokenizer)


def _write_side_files(out: Path, args: ModelArgs, tokenizer: str | Path | None) -> Path:
    """params.json and (when given) tokenizer.model beside the weights."""
    (out / "params.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def make_random_checkpoint(
    args: ModelArgs,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    fmt: str = "safetensors",
    tokenizer: str | Path | None = None,
) -> Path:
    """A random-weights checkpoint in the native layout (streamed: fits any size on disk)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "pth":
        return save_checkpoint(out, args, dict(_random_tensors(args, dtype, seed)), fmt, tokenizer)
    tmp = out / "consolidated.safetensors.partial"
    write_safetensors(tmp, expected_shapes(args), dtype, _random_tensors(args, dtype, seed))
    tmp.replace(out / "consolidated.safetensors")  # never leave a half-written file under the real name
    return _write_side_files(out, args, tokenizer)
