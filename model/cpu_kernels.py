"""CPU fast paths for bf16 linear layers, each on a weight re-laid out once at load.

- oneDNN's pre-packed layout (`pack_linears`): PyTorch's default bf16 matrix-vector product on CPU
  reaches ~18 GB/s of weight reads on this kind of machine (2 cores, AVX512-BF16), well below the
  memory bandwidth; the same GEMM on a weight packed once by oneDNN (what inductor's freezing pass
  does) gives bit-identical results 1.2-3x faster in decode, and it is the faster kernel from 3
  rows a step up (batched decode, prefill).
- The engine's own bf16 kernel (`block_linears`, model/csrc/cpu_linear.cpp, built at run time with
  torch's cpp_extension): weights in blocks of 8 rows read as one sequential stream. With AVX512-BF16,
  1.3-1.45x oneDNN's packed kernel at 1-2 rows a step (decode at batch 1-2), slower from 3 rows. On
  CPUs with AVX2 but no AVX-512 (AMD Zen 2/3, ...), where oneDNN cannot pack bf16 at all, an AVX2 build
  of the same kernel: 1.6x torch's plain bf16 GEMM at 1 row, 3-5x from 2 rows (docs/benchmarks.md).
  Needs a C++ compiler and ninja; without them the engine stays on oneDNN (or torch) and says why.

Parameter names do not change; a re-laid-out weight has the same shape (oneDNN's is opaque), so such
a model is for inference only (do not save its state_dict; `unpack_linears` restores plain weights).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from model.args import first_line


@functools.cache
def packing_error() -> str:
    """Why oneDNN's bf16 packed layout is unavailable here ("" where it works; tried once on a small
    weight): oneDNN's bf16 path needs AVX512 (bw, vl, dq) or AVX-NE-CONVERT, and raises on other CPUs
    (AVX2-only ones such as AMD Zen 3), where the bf16 linears stay on torch's plain kernel."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "this torch build has no oneDNN packed linears"
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 32, dtype=torch.bfloat16), 1)
    except RuntimeError as e:
        return f"oneDNN cannot pack bf16 weights on this CPU ({first_line(e)[:160]})"
    return ""


def _bf16_cpu_linear(mod: nn.Module) -> TypeGuard[nn.Linear]:
    """A plain nn.Linear with a bf16 weight on the CPU: what packing and the plain-kernel count take."""
    return type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu"


@torch.library.custom_op("mistral_pipeline::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., in] @ packed weight -> [..., out]. An opaque op for torch.compile: inductor lowers
    oneDNN linears only for weights it packed itself (freezing, which would keep a second copy of
    every weight), so a compiled step calls the already-packed kernel through this op."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class PackedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.weight, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Re-lay every bf16 CPU nn.Linear of model in place; returns how many were packed."""
    if packing_error():
        return 0
    packed = 0
    for mod in model.modules():
        if _bf16_cpu_linear(mod):
            w = torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach(), 1)
            # Check once that this build computes the same numbers through the packed weight.
            probe = torch.randn(2, mod.in_features, dtype=torch.bfloat16)
            if not torch.equal(
                torch.ops.mkldnn._linear_pointwise(probe, w, None, "none", [], ""), F.linear(probe, mod.weight.detach())
            ):
                return packed
            mod.weight = nn.Parameter(w, requires_grad=False)
            mod.__class__ = PackedLinear
            packed += 1
    return packed


def unpack_linears(model: nn.Module) -> int:
    """Undo pack_linears and block_linears in place (one tensor at a time): plain [out, in] weights
    that other code (transformers) can use. Returns how many were restored."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, BlockedLinear):
            kernels = blocked_kernels()
            assert kernels is not None  # the module could not have been blocked without them
            mod.weight = nn.Parameter(kernels.unblock_weight(mod.weight.detach()), requires_grad=False)
        elif isinstance(mod, nn.Linear) and mod.weight.is_mkldnn:
            mod.weight = nn.Parameter(mod.weight.detach().to_dense(), requires_grad=False)
        else:
            continue
        mod.__class__ = nn.Linear
        n += 1
    return n


# ---- the engine's own kernels (AVX512-BF16 or AVX2 builds) ------------------------------------------

_SOURCE = Path(__file__).parent / "csrc" / "cpu_linear.cpp"
# One source, two builds (each cached under its own name): every kernel with AVX-512, the bf16 one only
# with AVX2 (model/csrc/cpu_linear.cpp says why).
_FLAGS = {
    "avx512": ["-O3", "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni",
               "-mf16c", "-fopenmp"],
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
}
ISA_NAMES = {"avx512": "AVX512-BF16", "avx2": "AVX2"}
_kernels: ModuleType | None = None
_kernels_error: str | None = None


def _cpu_isa() -> str | None:
    """"avx512" where the CPU has AVX512-BF16 and AVX512-VNNI (every CPU with the first has the second:
    Cooper Lake, Sapphire Rapids and later, Zen 4 and later), else "avx2" with AVX2, FMA and F16C,
    else None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return None
    if {"avx512_bf16", "avx512_vnni", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else None


def kernels_isa() -> str | None:
    """Which build of the engine's kernels this process has ("avx512", "avx2"), None if none."""
    k = blocked_kernels()
    return None if k is None else str(k.ISA)


def int_kernels() -> ModuleType | None:
    """The engine's kernels when they include int8 and int4 (the AVX-512 build), else None."""
    k = blocked_kernels(log=True)
    return k if k is not None and hasattr(k, "int8_linear") else None


def blocked_kernels_error() -> str | None:
    """Why the engine's kernels are unavailable (None when they are available or not yet tried)."""
    return _kernels_error


def blocked_kernels(log: bool = False) -> ModuleType | None:
    """The compiled kernel module, built on first use (about 30 s on 2 cores, then cached by torch in
    $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); None where this CPU, compiler or torch
    build cannot have it (the reason: blocked_kernels_error())."""
    global _kernels, _kernels_error
    if _kernels is not None or _kernels_error is not None:
        return _kernels
    isa = _cpu_isa()
    if isa is None:
        _kernels_error = "this CPU has neither AVX512-BF16 nor AVX2 with FMA"
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
        name = "mistral_pipeline_cpu_linear" + ("" if isa == "avx512" else "_" + isa)
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        lock = build_dir / "lock"  # left by a build that was killed: torch would wait on it forever
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
        t0 = time.monotonic()
        if log and not (build_dir / f"{name}.so").exists():
            print(f"building the {ISA_NAMES[isa]} linear kernels once (~30 s; cached in {build_dir})", file=sys.stderr)
        _kernels = cpp_extension.load(name, [str(_SOURCE)], extra_cflags=_FLAGS[isa], extra_ldflags=["-fopenmp"])
        if log and time.monotonic() - t0 > 2:
            print(f"{ISA_NAMES[isa]} linear kernels built in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    except Exception as e:  # no compiler, no ninja, no headers: oneDNN stays
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _kernels_error = f"could not build it ({type(e).__name__}: {first[:200]})"
    return _kernels


@torch.library.custom_op("mistral_pipeline::blocked_linear", mutates_args=())
def blocked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] bf16 @ a weight laid out by block_weight -> [..., out] bf16 (an opaque op for
    torch.compile, like packed_linear)."""
    assert _kernels is not None
    return _kernels.blocked_linear(x, weight)  # type: ignore[no-any-return]


@blocked_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def loaded_kernels() -> ModuleType | None:
    """The kernel module if this process has already built or loaded it, else None (never builds:
    for callers such as attention that use a kernel only where the linears brought it in)."""
    return _kernels


@torch.library.custom_op("mistral_pipeline::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row, bf16: q [B, H, D] over k, v [B, K, Hkv, D] where mask [B, K] -> [B, H, D]
    (fp32 inside; model/csrc/cpu_linear.cpp). An opaque op for torch.compile."""
    assert _kernels is not None
    return _kernels.decode_attention(q, k, v, mask)  # type: ignore[no-any-return]


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("mistral_pipeline::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """x [..., in] @ (int8 weight laid out by int8_block_, times its scales: per output channel when
    group is 0, else per group of inputs)^T -> [..., n] float32 (model.quant.QuantLinear's CPU int8
    kernel; an opaque op for torch.compile)."""
    assert _kernels is not None
    return _kernels.int8_linear(x, qweight, scales, group, n)  # type: ignore[no-any-return]


@int8_linear.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.custom_op("mistral_pipeline::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, sm: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., in] (quantized to int8 per group inside) @ an int4 weight laid out by
    model.quant.int4_block_weight -> [..., out] float32 (an opaque op for torch.compile)."""
    assert _kernels is not None
    return _kernels.int4_linear(x, qweight, sm, group)  # type: ignore[no-any-return]


@int4_linear.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, sm: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)


class BlockedLinear(nn.Linear):
    """A bias-free bf16 nn.Linear whose weight is in the engine's bf16 kernel's blocked layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return blocked_linear(x, self.weight)
        assert _kernels is not None
        return _kernels.blocked_linear(x, self.weight)  # type: ignore[no-any-return]


def blockable(mod: nn.Module) -> bool:
    return (
        type(mod) is nn.Linear
        and mod.bias is None
        and mod.weight.dtype == torch.bfloat16
        and mod.weight.device.type == "cpu"
        and not mod.weight.is_mkldnn
        and mod.out_features % 8 == 0
        and mod.in_features % 32 == 0
    )


def block_linears(model: nn.Module) -> int:
    """Re-lay every bf16 CPU nn.Linear the kernel takes (out a multiple of 8, in of 32, no bias) in
    place; returns how many (0 where the kernel is unavailable: see blocked_kernels_error)."""
    mods = [m for m in model.modules() if isinstance(m, nn.Linear) and blockable(m)]
    if not mods:
        return 0
    kernels = blocked_kernels(log=True)
    if kernels is None:
        return 0
    block_weight = kernels.block_weight
    for mod in mods:
        mod.weight = nn.Parameter(block_weight(mod.weight.detach()), requires_grad=False)
        mod.__class__ = BlockedLinear
    return len(mods)


def linear_kernels(model: nn.Module) -> dict[str, int]:
    """How many linears of model run on each kernel: {"blocked": n, "onednn": n, "int8blk": n, ...}
    (zeros left out)."""
    counts = {
        "blocked": sum(isinstance(m, BlockedLinear) for m in model.modules()),
        "onednn": sum(isinstance(m, PackedLinear) for m in model.modules()),
    }
    for m in model.modules():  # quantized linears name their kernel (model.quant.QuantLinear.kernel)
        kernel = getattr(m, "kernel", None)
        if isinstance(kernel, str):
            counts[kernel] = counts.get(kernel, 0) + 1
    return {k: v for k, v in counts.items() if v}


CPU_LINEAR_KINDS = ("auto", "blocked", "onednn")
BLOCKED_MAX_ROWS = 2  # the blocked kernel is the faster one up to this many rows per step (measured)


def prepare_cpu_linears(model: nn.Module, kind: str = "auto", step_rows: int | None = None) -> str:
    """Lay out the bf16 CPU linears of model for the chosen kernel; returns what was done, one line.
    kind "auto": the blocked kernel when a decode step has at most BLOCKED_MAX_ROWS rows per stage
    (step_rows; unknown counts as many) or oneDNN cannot pack bf16 on this CPU, and the kernel is
    available; else oneDNN's packed layout.
    "blocked" falls back to oneDNN (saying why) where the kernel is unavailable. Linears the blocked
    kernel does not take (shapes, bias) are packed by oneDNN either way."""
    if kind not in CPU_LINEAR_KINDS:
        raise ValueError(f"unknown CPU linear kernel {kind!r} (one of {', '.join(CPU_LINEAR_KINDS)})")
    why = ""
    few = step_rows is not None and step_rows <= BLOCKED_MAX_ROWS
    # Where oneDNN cannot pack bf16 (AVX2-only CPUs) the blocked kernel wins at every row count: torch's
    # plain bf16 GEMM there is 1.6x slower at 1 row and 4-5x from 2 rows (docs/benchmarks.md).
    if kind == "blocked" or (kind == "auto" and (few or packing_error())):
        nb = block_linears(model)
        if nb:
            n = pack_linears(model)
            rest = f"; {n} others on oneDNN's packed layout" if n else ""
            return f"{nb} bf16 linears on the engine's {ISA_NAMES[str(kernels_isa())]} kernel (blocked layout){rest}"
        why = blocked_kernels_error() or "no bf16 linear fits it"
    elif any(_bf16_cpu_linear(m) for m in model.modules()):
        blocked_kernels(log=True)  # not for the linears: its one-query attention serves bf16 decode steps
    n = pack_linears(model)
    reason = f" (not the engine's bf16 kernel: {why})" if why else ""
    if n:
        return f"{n} bf16 linears on oneDNN's packed layout{reason}"
    plain = sum(_bf16_cpu_linear(m) for m in model.modules())
    if plain and packing_error():
        why = f"; not the engine's bf16 kernel: {why}" if why else ""
        return f"{plain} bf16 linears on torch's plain kernel ({packing_error()}{why})"
    return ""
