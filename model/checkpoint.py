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
from model.quant import (
    QuantSpec,
    check_shape,
    gguf_direct,
    install,
    is_quantizable,
    quantize,
    resolve,
    source_quantization,
    spec_for,
    suffixes,
)
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
    quant: QuantSpec | None = None,
    quant_flag: str | None = None,
) -> Transformer:
    """Build the modules of one stage (all of the model by default) and load their weights from a
    model path (any format) or an opened source, merging a LoRA adapter's deltas when given.
    With `quant` (or from a quantized checkpoint) the linears become model.quant.QuantLinear, each
    weight quantized as soon as it is read, so peak memory is the quantized share plus one tensor.
    quant_flag: the --quantize text as given (None: unset), to refuse a quantized checkpoint asked
    for in another format; without it any `quant` counts as asked for."""
    source = model if not isinstance(model, (str, Path)) else open_source(model)
    args = source.args
    where = getattr(source, "where", str(source.path))
    want = expected_shapes(args)
    stored = source_quantization(source)
    quant = resolve(source, quant, flag_given=quant is not None or quant_flag is not None)
    if stored is not None and lora is not None:
        raise ConfigError(f"{where} is quantized: merge the LoRA adapter into the float model, then quantize it")

    def on_disk(n: str) -> list[str]:  # a quantized checkpoint stores <linear>.qweight, .scales (, .mins)
        if stored is None or not is_quantizable(n):
            return [n]
        return [n.removesuffix("weight") + s for s in suffixes(spec_for(n, stored).mode)]

    unexpected = sorted(set(source.names) - {d for n in want for d in on_disk(n)})
    if unexpected:
        raise ConfigError(
            f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for the model's configuration"
        )
    with torch.device("meta"):
        stage = Transformer(args, layers, first, last)
    names = list(stage.state_dict())
    missing = [d for n in names for d in on_disk(n) if d not in source.names]
    if missing:
        raise ConfigError(f"{where}: tensor {missing[0]} is missing ({len(missing)} in all)")
    qnames = {n for n in names if quant is not None and is_quantizable(n)}
    for n in names:
        if n in qnames:
            assert quant is not None
            check_shape(n, want[n], spec_for(n, quant))
        if on_disk(n) != [n]:
            q, (rows, cols) = on_disk(n)[0], want[n]
            packed = (rows, cols if spec_for(n, quant or QuantSpec("int8")).mode == "int8" else cols // 2)
            if source.shape(q) != packed:
                raise ConfigError(f"{where}: tensor {q} has shape {list(source.shape(q))}, expected {list(packed)}")
        elif source.shape(n) != want[n]:
            raise ConfigError(
                f"{where}: tensor {n} has shape {list(source.shape(n))}, the configuration implies {list(want[n])}"
            )
    if lora is not None:
        lora.check(args, names)
    total = sum(math.prod(want[n]) for n in names)
    state: dict[str, torch.Tensor] = {}
    t0, last_report, done = time.monotonic(), 0.0, 0
    elem = torch.tensor([], dtype=dtype or torch.bfloat16).element_size()  # for the progress line
    for i, n in enumerate(names):
        delta = lora.delta(n) if lora is not None else None
        if n in qnames:
            assert quant is not None
            spec = spec_for(n, quant)
            direct = gguf_direct(source, n, spec) if stored is None and delta is None else None
            if stored is not None:
                parts = {d.rpartition(".")[2]: source.get(d, None) for d in on_disk(n)}
            elif direct is not None:  # GGUF Q4 / Q8_0 blocks map straight in
                parts = direct
            else:  # read and quantized at once: one float tensor in memory
                t = source.get(n, None if delta is None else torch.float32)
                parts = quantize(t if delta is None else t + delta, spec)
                del t
            for s, v in parts.items():
                state[n.removesuffix("weight") + s] = v.to(device=device)
        else:
            if delta is None:
                t = source.get(n, dtype)
            else:  # W + scale * B A, in fp32, then the run dtype
                t = source.get(n, torch.float32)
                t = (t + delta).to(dtype or t.dtype)
            state[n] = t.to(device=device)
            elem = t.element_size()
        done += math.prod(want[n])
        now = time.monotonic()
        if (
            progress is not None
            and total * elem >= PROGRESS_MIN_BYTES
            and (now - last_report > 2 or i + 1 == len(names))
        ):
            last_report = now
            gb = total * elem / 1e9
            pct = 100 * done / total
            progress(f"loading {i + 1}/{len(names)} tensors, {pct:.0f}% of {gb:.1f} GB, {now - t0:.0f} s")
    floats = {k: v for k, v in state.items() if k in want}  # quantized buffers keep their own dtypes
    if len({v.dtype for v in floats.values()}) > 1:
        # Mixed files (e.g. fp32 norms in a bf16 checkpoint) run in the largest tensor's dtype.
        common = max(floats.values(), key=lambda v: v.numel()).dtype
        state.update({k: v.to(common) for k, v in floats.items()})
    if quant is not None:
        install(stage, qnames, quant)
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
    write_safetensors_mixed(path, {n: (s, dtype) for n, s in names_shapes.items()}, tensors)


def write_safetensors_mixed(
    path: Path,
    entries: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """write_safetensors with a dtype per tensor: entries name -> (shape, dtype), in file order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in entries.items():
        n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
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
            assert (tuple(t.shape), t.dtype) == entries[name], name
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())  # numpy has no bfloat16


def write_quantized(
    source: Source,
    out_dir: str | Path,
    spec: QuantSpec,
    dtype: torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """A quantized native checkpoint of any source: params.json with a `quantization` block,
    consolidated.safetensors holding <linear>.qweight / .scales (/ .mins) and the other tensors in
    dtype (default: as stored; float32 for GGUF), and the source's tokenizer. Streamed: one float
    tensor in memory at a time."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args, shapes = source.args, expected_shapes(source.args)
    if source_quantization(source) is not None:
        raise ConfigError(f"{source.path} is already quantized; quantize the original float model")
    missing = [n for n in shapes if n not in source.names]
    if missing:
        raise ConfigError(f"{source.path}: tensor {missing[0]} is missing ({len(missing)} in all)")
    float_dtype = dtype or (torch.float32 if source.kind == "gguf" else None)
    entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # in file order
    for n, shape in shapes.items():
        if not is_quantizable(n):
            entries[n] = (shape, float_dtype or source.get(n, None).dtype)
            continue
        sp, (rows, cols), base = spec_for(n, spec), shape, n.removesuffix("weight")
        check_shape(n, shape, sp)
        if sp.mode == "int8":
            entries[base + "qweight"] = ((rows, cols), torch.int8)
            per_row = ((rows,), torch.float32)
            entries[base + "scales"] = ((rows, cols // sp.group), torch.float16) if sp.group else per_row
        else:
            entries[base + "qweight"] = ((rows, cols // 2), torch.uint8)
            entries[base + "scales"] = ((rows, cols // sp.group), torch.float16)
            entries[base + "mins"] = ((rows, cols // sp.group), torch.float16)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        t0 = last = time.monotonic()
        for i, n in enumerate(shapes):
            if is_quantizable(n):
                sp = spec_for(n, spec)
                parts = gguf_direct(source, n, sp) or quantize(source.get(n, None), sp)
                for s, v in parts.items():
                    yield n.removesuffix("weight") + s, v
            else:
                yield n, source.get(n, entries[n][1])
            if progress is not None and (time.monotonic() - last > 5 or i + 1 == len(shapes)):
                last = time.monotonic()
                progress(f"quantize: {i + 1}/{len(shapes)} tensors, {last - t0:.0f} s")

    tmp = out / "consolidated.safetensors.partial"
    write_safetensors_mixed(tmp, entries, tensors())
    tmp.replace(out / "consolidated.safetensors")
    params = {**args.to_dict(), "quantization": spec.to_dict()}
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    _copy_tokenizer(source, out)
    return out


def _copy_tokenizer(source: Source, out: Path) -> None:
    """The source's tokenizer beside the weights: its files for a directory; for a GGUF, the
    tokenizer it describes as tokenizer.json + tokenizer_config.json + generation_config.json."""
    src = Path(source.path)
    if src.is_dir():
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        if not (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file():
            for tm in sorted(src.glob("tokenizer.model*"))[:1]:
                shutil.copyfile(tm, out / "tokenizer.model")
        return
    from model.hf_tokenizer import HFTokenizer

    tok = source.tokenizer()
    assert isinstance(tok, HFTokenizer)
    tok.backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = dict(tok.special_tokens)
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": list(tok.eos_ids)}) + "\n")


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
