"""Build a stage and fill it from a checkpoint source (model/formats/); write native checkpoints.

A process builds only its own modules on the meta device and reads only their tensors, one at a
time, so its peak memory is its share of the weights, never the whole model.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.args import ConfigError, ModelArgs
from model.formats import Source, open_source
from model.formats.files import ST_TO_TORCH
from model.transformer import Transformer

if TYPE_CHECKING:
    from model.formats.lora import LoraAdapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROGRESS_MIN_BYTES = 256 << 20  # loads smaller than this are quiet


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name in ("", "auto"):
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        full = Transformer(args)
    return {k: tuple(v.shape) for k, v in full.state_dict().items()}


def load_stage(
    model: str | Path | Source,
    layers: Sequence[int] | None = None,
    first: bool = True,
    last: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    lora: LoraAdapter | None = None,
) -> Transformer:
    """Build the modules of one stage (all of the model by default) and load their weights from a
    model path (any format) or an opened source, merging a LoRA adapter's deltas when given."""
    source = model if not isinstance(model, (str, Path)) else open_source(model)
    args = source.args
    where = getattr(source, "where", str(source.path))
    want = expected_shapes(args)
    unexpected = sorted(set(source.names) - set(want))
    if unexpected:
        raise ConfigError(
            f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for the model's configuration"
        )
    with torch.device("meta"):
        stage = Transformer(args, layers, first, last)
    names = list(stage.state_dict())
    missing = [n for n in names if n not in source.names]
    if missing:
        raise ConfigError(f"{where}: tensor {missing[0]} is missing ({len(missing)} in all)")
    for n in names:
        if source.shape(n) != want[n]:
            raise ConfigError(
                f"{where}: tensor {n} has shape {list(source.shape(n))}, the configuration implies {list(want[n])}"
            )
    if lora is not None:
        lora.check(args, names)
    total = sum(math.prod(want[n]) for n in names)
    state: dict[str, torch.Tensor] = {}
    t0, last_report, done = time.monotonic(), 0.0, 0
    for i, n in enumerate(names):
        delta = lora.delta(n) if lora is not None else None
        if delta is None:
            t = source.get(n, dtype)
        else:  # W + scale * B A, in fp32, then the run dtype
            t = source.get(n, torch.float32)
            t = (t + delta).to(dtype or t.dtype)
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
        # Mixed files (e.g. fp32 norms in a bf16 checkpoint) run in the largest tensor's dtype.
        common = max(state.values(), key=lambda v: v.numel()).dtype
        state = {k: v.to(common) for k, v in state.items()}
    stage.load_state_dict(state, strict=True, assign=True)
    return stage.eval()


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
            "dtype": next(k for k, v in ST_TO_TORCH.items() if v == dtype),
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
    """A random-weights checkpoint (streamed: fits any size on disk): the native layout
    (fmt safetensors or pth), or a Hugging Face directory (fmt hf: sharded, with an index)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        from model.formats.hf import write_hf_dir

        write_hf_dir(out, args, expected_shapes(args), dtype, _random_tensors(args, dtype, seed))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, out / "tokenizer.model")
        return out
    if fmt == "pth":
        return save_checkpoint(out, args, dict(_random_tensors(args, dtype, seed)), fmt, tokenizer)
    tmp = out / "consolidated.safetensors.partial"
    write_safetensors(tmp, expected_shapes(args), dtype, _random_tensors(args, dtype, seed))
    tmp.replace(out / "consolidated.safetensors")  # never leave a half-written file under the real name
    return _write_side_files(out, args, tokenizer)
