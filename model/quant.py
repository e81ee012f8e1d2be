"""Weight-only int8 / int4 linears: the formats, their error-bounded (de)quantization, and their CPU
kernels (the engine's own and PyTorch's).

Formats (canonical: what a quantized checkpoint stores and what load_stage builds, tensor by tensor):
  int8  per output channel, symmetric:  w[n, k] = qweight[n, k] * scales[n]
        qweight int8 [N, K], scales float32 [N]  (the default)
        or group-wise (--group_size G):     w[n, k] = qweight[n, k] * scales[n, k // G]
        scales float16 [N, K/G]. GGUF Q8_0 (block 32: w = q d) maps onto G = 32 exactly. On a small
        model whose weights carry little redundancy per-channel scales cost ~3% perplexity where
        groups of 32 cost none (SmolLM2-135M; tests/test_quant.py), for 0.5 bit more a weight.
  int4  group-wise with a zero point:   w[n, k] = q[n, k] * scales[n, g] + mins[n, g],  g = k // group
        q in 0..15 packed two per byte: qweight uint8 [N, K/2], column 2j in the low nibble, 2j+1 high;
        scales, mins float16 [N, K/group]. GGUF Q4_0 (w = (q - 8) d) and Q4_1 (w = q d + m), block 32,
        map onto this exactly (scales = d, mins = -8 d or m).

What is quantized: every linear a decode step streams (attention, dense and expert feed-forward, the
output head); the output head is int8 at most (int4 there costs the most accuracy for the least
memory). Kept in the run dtype: the token embedding (only gathered, a row per token: quantizing it
saves memory but no time), the norms and the MoE router (tiny, and routing is sensitive).

Kernels (QuantLinear.prepare, once after load and after fusing), on CPU:
  int8  the engine's kernel (model/csrc/cpu_linear.cpp, "int8blk": int8 weights in blocks of 16 rows,
        x quantized to 14 bits per chunk of inputs inside, two AVX512-VNNI dot products per 64 weight
        bytes; 2-4x the earlier fp32-FMA kernel), else (CPUs without AVX512-VNNI, --cpu_linear onednn)
        PyTorch's aten._weight_int8pack_mm ("int8cpu", bf16; per channel only: group-wise int8
        dequantizes there).
  int4  the engine's kernel ("int4blk", int4_block_weight's layout): x quantized to int8 per group
        inside the kernel and multiplied into the int4 weights with AVX512-VNNI integer dot
        products, as llama.cpp does (its Q4 x Q8 dot products); 1.25-1.4x PyTorch's
        aten._weight_int4pack_mm_for_cpu ("int4cpu", bf16 activations, the fallback) at 1 row and
        2-2.5x from 2 rows (scripts/quant_kernels.py). Out features a multiple of 16, groups of 32n.
  --cpu_linear onednn keeps PyTorch's kernels for both. For many rows (prefill: over KERNEL_MAX_ROWS
  for PyTorch's kernels, OWN_KERNEL_MAX_ROWS for the engine's) the weight is dequantized a block of
  rows at a time and multiplied by F.linear instead.
Other devices (CUDA): int8 per channel as x @ q^T then the scales (group-wise: dequantized); int4 on
PyTorch's tinygemm kernel (sm80+).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.args import ConfigError
from model.cpu_kernels import int4_linear, int8_linear, int_kernels

MODES = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
# Rows (tokens in a step) above which dequantize + F.linear beats the packed kernels. The kernels'
# time grows about linearly with rows; dequantizing costs a few passes over the weight whatever the
# rows, then a bf16 GEMM. PyTorch's packed kernels (14336 x 4096 int8 on 2 Zen 4 cores: 2.3 ms at 1
# row, 7 ms at 8, 57 ms at 64) lose from ~128 rows. The engine's (one 7B layer's linears, tokens/s
# through them, kernel vs dequantized): int8 884 vs 237 at 64 rows, 850 vs 648 at 512, 794 vs 765 at
# 1024, 729 vs 785 at 2048; int4 1243 vs 101 at 64, 1117 vs 561 at 1024, 966 vs 677 at 2048.
KERNEL_MAX_ROWS = 128
OWN_KERNEL_MAX_ROWS = {"int8blk": 1024, "int4blk": 4096}
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's int4 kernels (CPU and CUDA) take
_TORCH_INT4_ROWS = 64  # the CPU int4 kernel's weight layout packs output rows in blocks of 64 (or 32)
QUANT_BLOCK_ELEMS = 1 << 22  # weights quantized / re-laid out per block of rows of about this many elements


@functools.cache
def _torch_int4_half() -> int:
    """Bytes per input in a block of PyTorch's CPU int4 layout, half the block's output rows: 32 on
    AVX-512 CPUs, 16 on AVX2 ones (the layout follows the kernel's vector width; read off the op)."""
    q = torch.zeros(64, 64, dtype=torch.int32)
    q[0, 1] = 1  # row 0, input 1: one block's h bytes of input 0 come first
    return int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(-1).nonzero()[0])


@dataclass(frozen=True)
class QuantSpec:
    mode: str  # "int8" or "int4"
    # Inputs sharing a scale. None: the format's default, 32 for int4 and 0 (per output channel) for int8.
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("int8", "int4"):
            raise ConfigError(f"unknown quantization {self.mode!r}; choose from {', '.join(MODES)}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE if self.mode == "int4" else 0)
        elif self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"--group_size must be an even number >= 2, got {self.group_size}")

    @property
    def group(self) -> int:
        """Inputs sharing a scale; 0 for int8 per output channel."""
        assert self.group_size is not None
        return self.group_size

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "group_size": self.group} if self.group else {"mode": self.mode}

    def describe(self) -> str:
        return f"{self.mode} (group {self.group})" if self.group else self.mode

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> QuantSpec:
        if not isinstance(raw, dict) or raw.get("mode") not in ("int8", "int4"):
            raise ConfigError(f"{where}: 'quantization' must be {{\"mode\": \"int8\"|\"int4\", \"group_size\": N}}")
        group = raw.get("group_size")
        return cls(raw["mode"], None if group is None else int(group))


def parse_quantize(mode: str | None, group_size: int | None = None) -> QuantSpec | None:
    """--quantize as given: None when unset or 'none'."""
    if mode is None or mode == "none":
        return None
    return QuantSpec(mode, group_size)


def is_quantizable(name: str) -> bool:
    """Whether a checkpoint tensor is the weight of a linear that quantization converts."""
    if not name.endswith(".weight"):
        return False
    return name == "output.weight" or ".attention.w" in name or ".feed_forward.w" in name or ".experts." in name


def spec_for(name: str, spec: QuantSpec) -> QuantSpec:
    """The output head is int8 at most (per output channel where the rest is int4)."""
    return QuantSpec("int8") if name == "output.weight" and spec.mode == "int4" else spec


def suffixes(mode: str) -> tuple[str, ...]:
    return ("qweight", "scales") if mode == "int8" else ("qweight", "scales", "mins")


def check_shape(name: str, shape: tuple[int, ...], spec: QuantSpec) -> None:
    if spec.group and shape[1] % spec.group:
        other = "--quantize int8" if spec.mode == "int4" else "--quantize int8 without --group_size"
        raise ConfigError(
            f"{name}: input dimension {shape[1]} is not a multiple of the {spec.mode} group size {spec.group}; "
            f"choose a --group_size that divides it (e.g. {_divisor_hint(shape[1])}) or use {other}"
        )


def _divisor_hint(n: int) -> int:
    return next(g for g in (128, 64, 32, 16, 8, 4, 2) if n % g == 0) if n % 2 == 0 else 0


# -- quantize / dequantize (canonical formats) ------------------------------------------------------


def quantize(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """w [N, K] (any float dtype) -> the canonical tensors of spec's format. Works through blocks of
    rows, so its float32 temporaries stay small next to a rank's share (a Mixtral expert is 235 MB
    in float32; each step of the arithmetic below would otherwise hold one more copy)."""
    rows = max(64, QUANT_BLOCK_ELEMS // max(1, w.shape[1]))
    if w.shape[0] > rows:
        parts = [_quantize(w[i : i + rows], spec) for i in range(0, w.shape[0], rows)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return _quantize(w, spec)


def _quantize(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    w = w.detach().float()
    n, k = w.shape
    g = spec.group
    if spec.mode == "int8" and not g:
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [N]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    wg = w.view(n, k // g, g)
    if spec.mode == "int8":  # the scale rounded to float16 first, so q is computed against what is stored
        s16 = (wg.abs().amax(-1) / 127).to(torch.float16)  # [N, K/g]
        s16 = torch.where(s16 > 0, s16, torch.ones_like(s16))
        q = torch.round(wg / s16.float()[..., None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q.view(n, k), "scales": s16}
    lo, hi = wg.amin(-1), wg.amax(-1)  # [N, K/g]
    # Round scale and offset to their stored precision first, so q is computed against what is stored.
    scales = ((hi - lo) / 15).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    mins = lo.to(torch.float16)
    q = torch.round((wg - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return {"qweight": pack_nibbles(q.view(n, k)), "scales": scales, "mins": mins}


def dequantize(t: dict[str, torch.Tensor], mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The canonical tensors -> the weight [N, K] in dtype."""
    if mode == "int8" and t["scales"].dim() == 1:
        return (t["qweight"].to(dtype) * t["scales"].to(dtype)[:, None]).to(dtype)
    if mode == "int8":
        n, k = t["qweight"].shape
        s = t["scales"].float()
        return (t["qweight"].view(n, s.shape[1], -1).float() * s[..., None]).view(n, k).to(dtype)
    q = unpack_nibbles(t["qweight"])  # [N, K] uint8
    n, k = q.shape
    groups = t["scales"].shape[1]
    w = q.view(n, groups, k // groups).float() * t["scales"].float()[..., None] + t["mins"].float()[..., None]
    return w.view(n, k).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8, column 2j low, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] values 0..15."""
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], -1)


def error_bound(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Largest |w - dequantize(quantize(w))| allowed per row [N]: half a step (plus float16 rounding of
    the int4 scale and offset, a few units in the last place of each)."""
    w = w.float()
    if spec.mode == "int8" and not spec.group:
        return w.abs().amax(1) / 127 / 2 * (1 + 1e-5)
    n, k = w.shape
    wg = w.view(n, k // spec.group, spec.group)
    if spec.mode == "int8":  # half a step of the float16 scale (relative error <= 2^-11), or its clamp
        return (wg.abs().amax(-1) / 127 / 2 * (1 + 2e-3) + 2**-24 * 64).amax(1)
    step = (wg.amax(-1) - wg.amin(-1)) / 15  # [N, K/g]
    slack = 2e-3 * wg.abs().amax(-1)  # float16 scale/min rounding, times up to 15 steps
    return (step / 2 + slack).amax(1) * (1 + 1e-5)


# -- the engine's int4 kernel layout (model/csrc/cpu_linear.cpp, int4_linear) ---------------------------

# Output rows per block of the engine's int4 and int8 layouts: one row per 32-bit lane of a vector
# (model/csrc/cpu_linear.cpp, LANES; int4_block_weight, int8_block_).
BLOCK_ROWS = 16


def int4_blockable(n: int, k: int, group: int) -> bool:
    return n % BLOCK_ROWS == 0 and group % 32 == 0 and k % group == 0


def int4_block_weight(t: dict[str, torch.Tensor], group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical int4 -> (weight uint8 [N, K/2], scales and mins fp16 [N/16, K/group, 2, 16]) in the
    engine's kernel layout: per block of 16 rows, per 32 inputs, 4 vectors c of 16 rows x 4 bytes, byte
    b of row r holding input 4c + b in its low nibble and input 16 + 4c + b in its high one. Rows lo:hi
    of the weight (lo, hi multiples of 16) are blocks lo/16:hi/16; a block of rows at a time keeps
    temporaries small."""
    qweight, scales, mins = t["qweight"], t["scales"], t["mins"]
    n, k = qweight.shape[0], qweight.shape[1] * 2
    rows = max(BLOCK_ROWS, QUANT_BLOCK_ELEMS // k // BLOCK_ROWS * BLOCK_ROWS)
    parts = []
    for i in range(0, n, rows):
        q = unpack_nibbles(qweight[i : i + rows]).view(-1, 16, k // 32, 2, 4, 4)  # (block, r, k/32, half, c, b)
        parts.append((q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).reshape(-1, k // 2))
    packed = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
    sm = torch.stack([scales, mins]).to(torch.float16).view(2, n // 16, 16, k // group).permute(1, 3, 0, 2)
    return packed, sm.contiguous()


def int4_unblock_weight(packed: torch.Tensor, sm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of int4_block_weight (whole blocks of rows)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    p = packed.view(n // 16, k // 32, 4, 16, 4).permute(0, 3, 1, 2, 4)  # (block, r, k/32, c, b)
    q = torch.stack([p & 15, p >> 4], dim=3).reshape(n, k)  # (block, r, k/32, half, c, b)
    scales, mins = sm.permute(2, 0, 3, 1).reshape(2, n, sm.shape[1])
    return {"qweight": pack_nibbles(q), "scales": scales, "mins": mins}


# -- GGUF blocks straight into the int4 and int8 formats ---------------------------------------------


def gguf_direct(source: Any, name: str, spec: QuantSpec) -> dict[str, torch.Tensor] | None:
    """A GGUF Q4_0 / Q4_1 tensor as canonical int4, or a Q8_0 tensor as canonical group-wise int8,
    without a float detour, when spec's group is the block size (32); None when the tensor is stored
    otherwise (the caller quantizes the float)."""
    if spec.group != 32 or getattr(source, "kind", "") != "gguf":
        return None
    from gguf import GGMLQuantizationType as Q

    entry = getattr(source, "_map", {}).get(name)
    types = (Q.Q4_0, Q.Q4_1) if spec.mode == "int4" else (Q.Q8_0,)
    if entry is None or entry[0].tensor_type not in types:
        return None
    t, expert = entry
    raw = np.array(t.data if expert is None else t.data[expert])  # a copy: never a view of the mapped file
    n, k = source.shape(name)
    if spec.mode == "int8":  # Q8_0: fp16 d, then 32 int8
        blocks = torch.from_numpy(raw.reshape(n, k // 32, 34))
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # [N, K/32]
        return {"qweight": blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), "scales": d.clone()}
    head = 2 if t.tensor_type == Q.Q4_0 else 4  # fp16 d (and fp16 m) before 16 bytes of nibbles
    blocks = torch.from_numpy(raw.reshape(n, k // 32, head + 16))
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # [N, K/32]
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if head == 4 else (d.float() * -8).half()
    qs = blocks[..., head:]  # [N, K/32, 16]: element j in the low nibble of byte j, j + 16 in the high one
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
    return {"qweight": pack_nibbles(q), "scales": d.clone(), "mins": m.clone()}


# -- the module --------------------------------------------------------------------------------------


def _own_kernels() -> Any:
    """The engine's compiled kernels, for a module prepare() put on them (so they were built)."""
    kernels = int_kernels()
    assert kernels is not None
    return kernels


class QuantLinear(nn.Module):
    """y = x W^T with W held as int8 or int4 (canonical buffers until prepare())."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, device: torch.device | str = "meta"):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        n, k = out_features, in_features
        if spec.mode == "int8":
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
            shape, dtype = ((n, k // spec.group), torch.float16) if spec.group else ((n,), torch.float32)
            self.register_buffer("scales", torch.empty(shape, dtype=dtype, device=device))
        else:
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
            g = k // spec.group
            self.register_buffer("scales", torch.empty(n, g, dtype=torch.float16, device=device))
            self.register_buffer("mins", torch.empty(n, g, dtype=torch.float16, device=device))
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.mins: torch.Tensor
        # after prepare() on CPU: "int8blk" / "int4blk" (the engine's kernels), "int8cpu" / "int4cpu" (PyTorch's)
        self.kernel = "generic"
        self._sz: torch.Tensor | None = None  # int4 CPU: [K/g, N, 2] bf16 (scale, zero)
        self._scales_bf16: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> QuantLinear:
        mod = cls(in_features, t["qweight"].shape[0], spec)
        for k, v in t.items():
            setattr(mod, k, v)
        return mod

    def canonical(self) -> dict[str, torch.Tensor]:
        assert self.kernel == "generic" or self.spec.mode == "int8", "int4 weights were re-laid out for the kernel"
        if self.kernel == "int8blk":
            n = self.out_features
            return {"qweight": self._int8_rows(0, n), "scales": self._int8_scales(0, n)}
        return {s: getattr(self, s) for s in suffixes(self.spec.mode)}

    def _int8_scales(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of the int8 scales in canonical order (int8blk group-wise: [Np/16, K/g, 16] blocks)."""
        if self.kernel != "int8blk" or not self.spec.group:
            return self.scales[lo:hi]
        assert lo % BLOCK_ROWS == 0
        b = self.scales[lo // BLOCK_ROWS : -(-hi // BLOCK_ROWS)]
        return b.transpose(1, 2).reshape(-1, b.shape[1])[: hi - lo]

    def _int8_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of the int8 weight in [N, K] order (int8blk: int8_block_'s layout, whole blocks of
        16 rows unblock alone)."""
        if self.kernel != "int8blk":
            return self.qweight[lo:hi]
        assert lo % BLOCK_ROWS == 0
        b = self.qweight[lo : -(-hi // BLOCK_ROWS) * BLOCK_ROWS]
        k = self.in_features
        rows = b.view(-1, k // 4, BLOCK_ROWS, 4).transpose(1, 2).reshape(-1, k)
        return (rows.view(torch.uint8) ^ 0x80).view(torch.int8)[: hi - lo]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            self._sz.numel() * self._sz.element_size() if self._sz is not None else 0
        )

    def prepare(self, own_kernels: bool = True) -> None:
        """Re-lay the weights for this device's kernel (once, after loading and fusing). own_kernels:
        int8 and int4 on CPU through the engine's kernels (model/csrc/cpu_linear.cpp) where they can
        be built and the shape fits, else PyTorch's packed kernels. The engine's int8 layout is made
        in place: a qweight given to from_tensors must not be shared with anything that still needs
        it in [out, in] order."""
        if self.kernel != "generic":
            return
        if self.qweight.device.type == "cuda":
            self._prepare_cuda()
            return
        if self.qweight.device.type != "cpu":
            return
        n, k = self.out_features, self.in_features
        g = self.spec.group
        fits = self.spec.mode == "int8" and own_kernels and k % 32 == 0 and g % 32 == 0
        fits4 = self.spec.mode == "int4" and own_kernels and int4_blockable(n, k, self.spec.group)
        kernels = int_kernels() if fits or fits4 else None  # None on CPUs without AVX512-VNNI
        if kernels is not None and fits4:
            self.qweight, self.scales = int4_block_weight(self.canonical(), self.spec.group)
            self.mins = torch.empty(0)
            self.kernel = "int4blk"
        elif kernels is not None:
            q, rb = self.qweight, BLOCK_ROWS
            pad = -n % rb  # out features padded to whole blocks with zero rows (scale 1)
            # In place where this module owns the whole allocation (no second copy: freed copies stay
            # in the heap); a tensor from a file or a view of a larger one is copied first.
            owned = q.untyped_storage().resizable() and q.untyped_storage().nbytes() == q.numel()
            if pad:
                q = torch.cat([q, q.new_zeros(pad, k)])
            elif not (owned and q.is_contiguous()):
                q = q.contiguous().clone()
            kernels.int8_block_(q)
            self.qweight = q
            s = torch.cat([self.scales, self.scales.new_ones(pad, *self.scales.shape[1:])]) if pad else self.scales
            if g:  # the scales of a block's 16 rows together, group by group: [Np/16, K/g, 16]
                self.scales = s.view(-1, rb, k // g).transpose(1, 2).contiguous()
            else:
                self.scales = s.float().contiguous()
            self.kernel = "int8blk"
        elif self.spec.mode == "int8" and not g and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            self._scales_bf16 = self.scales.to(torch.bfloat16)
            self.kernel = "int8cpu"
        elif (
            self.spec.mode == "int4"
            and self.spec.group in INT4_KERNEL_GROUPS  # others dequantize
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
        ):
            # Blocks of 64 output rows are independent in the kernel's layout: convert a block of rows at
            # a time (the int32 input is 8x the packed bytes).
            rows = n if n % _TORCH_INT4_ROWS else max(_TORCH_INT4_ROWS, QUANT_BLOCK_ELEMS // k // 64 * 64)
            packed = torch.cat([
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    unpack_nibbles(self.qweight[i : i + rows]).to(torch.int32), 1
                )
                for i in range(0, n, rows)
            ])
            # The kernel computes (q - 8) * scale + zero: zero = min + 8 * scale.
            self._sz = self._scales_and_zeros()
            self.qweight = packed
            self.scales = self.mins = torch.empty(0)
            self.kernel = "int4cpu"

    def _scales_and_zeros(self) -> torch.Tensor:
        """[K/g, N, 2] bf16 (scale, zero) for PyTorch's int4 kernels (CPU and CUDA alike), which compute
        (q - 8) * scale + zero: zero = min + 8 * scale."""
        s, m = self.scales.float(), self.mins.float()
        return torch.stack([s.t(), (m + 8 * s).t()], dim=-1).to(torch.bfloat16).contiguous()

    def _prepare_cuda(self) -> None:
        """int8: x @ q^T in the activations' dtype, then the per-channel scales (no dequantized copy
        of the scaled weight). int4: PyTorch's tinygemm kernel (_weight_int4pack_mm, bf16, sm80+),
        which computes (q - 8) * scale + zero like the CPU kernel, on a layout made from the
        canonical nibbles (element 2j in the high nibble of byte j, as the kernel's packer takes them)."""
        n, k, g = self.out_features, self.in_features, self.spec.group
        if self.spec.mode == "int8":
            if not g:  # group-wise: the dequantizing path
                self.kernel = "int8cuda"
            return
        tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), 0)
        major, _ = torch.cuda.get_device_capability(self.qweight.device)
        if not (hasattr(torch.ops.aten, "_convert_weight_to_int4pack") and major >= 8 and tiles and n % 8 == 0
                and g in INT4_KERNEL_GROUPS):  # fmt: skip
            return  # the dequantizing path
        q = unpack_nibbles(self.qweight)  # [N, K] 0..15
        high_first = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(high_first, tiles)
        self._sz = self._scales_and_zeros()
        self.qweight = packed
        self.scales = self.mins = torch.empty(0, device=packed.device)
        self.kernel = "int4cuda"

    def _weight(self, dtype: torch.dtype, lo: int, hi: int) -> torch.Tensor:
        """Output rows lo:hi of the weight, dequantized to dtype [hi - lo, K]."""
        if self.kernel == "int8blk":
            return dequantize({"qweight": self._int8_rows(lo, hi), "scales": self._int8_scales(lo, hi)}, "int8", dtype)
        if self.kernel == "int4blk":
            blocks = self.scales[lo // BLOCK_ROWS : -(-hi // BLOCK_ROWS)]
            return dequantize(int4_unblock_weight(self.qweight[lo:hi], blocks), "int4", dtype)
        if self.kernel != "int4cpu":
            return dequantize({s: t[lo:hi] for s, t in self.canonical().items()}, self.spec.mode, dtype)
        # Undo the CPU kernel's layout (blocks of 2h output rows, [K, h] bytes each; row j of a block
        # in the low nibble, row h + j in the high one), then apply (q - 8) * scale + zero.
        n, k, h = hi - lo, self.in_features, _torch_int4_half()
        b = self.qweight[lo:hi].reshape(n // (2 * h), k, h)
        q = torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(n, k)
        assert self._sz is not None
        sz = self._sz[:, lo:hi].float()  # [K/g, n, 2]; float32: zero ~ 8 scales, bf16 would cancel badly
        g = self.spec.group
        w = (q.view(n, k // g, g).float() - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
        return w.view(n, k).to(dtype)

    def _dequantized_linear(self, x2: torch.Tensor) -> torch.Tensor:
        # A block of output rows at a time: the dequantized block stays small (and in cache).
        n = self.out_features
        rows = max(_TORCH_INT4_ROWS, QUANT_BLOCK_ELEMS // 4 // self.in_features // 64 * 64)
        if n <= rows or (self.kernel == "int4cpu" and n % _TORCH_INT4_ROWS) or x2.is_cuda:  # GPUs: one pass
            return F.linear(x2, self._weight(x2.dtype, 0, n))
        return torch.cat([F.linear(x2, self._weight(x2.dtype, i, min(n, i + rows))) for i in range(0, n, rows)], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [rows, K]
        rows = x2.shape[0]
        few = rows <= OWN_KERNEL_MAX_ROWS.get(self.kernel, KERNEL_MAX_ROWS)
        # The engine's kernels: called directly when eager, through their custom ops when compiled.
        if self.kernel == "int8blk" and few:
            int8 = int8_linear if torch.compiler.is_compiling() else _own_kernels().int8_linear
            y = int8(x2, self.qweight, self.scales, self.spec.group, self.out_features)
        elif self.kernel == "int4blk" and few:
            int4 = int4_linear if torch.compiler.is_compiling() else _own_kernels().int4_linear
            y = int4(x2, self.qweight, self.scales, self.spec.group)
        elif self.kernel == "int8cpu" and few:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self._scales_bf16)
        elif self.kernel == "int4cpu" and (few or self.out_features % _TORCH_INT4_ROWS):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.qweight, self.spec.group, self._sz
            )
        elif self.kernel == "int4cuda":
            y = torch.ops.aten._weight_int4pack_mm(
                x2.to(torch.bfloat16).contiguous(), self.qweight, self.spec.group, self._sz
            )
        elif self.kernel == "int8cuda":
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales.to(x2.dtype)
        else:
            y = self._dequantized_linear(x2)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        spec = self.spec.describe()
        return f"in_features={self.in_features}, out_features={self.out_features}, {spec}, {self.kernel}"


# -- model-level passes ------------------------------------------------------------------------------


def install(model: nn.Module, names: set[str], spec: QuantSpec) -> None:
    """Swap the nn.Linear of every `<module>.weight` in names for a (meta) QuantLinear of its spec."""
    for full in sorted(names):
        path = full.removesuffix(".weight")
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        assert isinstance(lin, nn.Linear), full
        setattr(parent, child, QuantLinear(lin.in_features, lin.out_features, spec_for(full, spec)))


def fuse_quantized(model: nn.Module) -> int:
    """The quantized twin of model.layers.fuse_projections: wq|wk|wv -> wqkv and w1|w3 -> w13 by
    concatenating the int data and scales along the output dimension (rows are independent in both
    formats). Run before prepare(). Returns the groups fused."""
    from model.layers import Attention, FeedForward

    groups: dict[type, tuple[str, tuple[str, ...]]] = {
        Attention: ("wqkv", ("wq", "wk", "wv")),
        FeedForward: ("w13", ("w1", "w3")),
    }
    n = 0
    # Only the parents are listed: a list of every module would keep each replaced linear (three
    # quarters of a layer's bytes) alive until the end, raising the peak by that much (measured:
    # +1.1 GB for 8 layers of the 7B shape at int8).
    for mod in [m for m in model.modules() if type(m) in groups]:
        fused_name, names = groups[type(mod)]
        if not hasattr(mod, fused_name) or getattr(mod, fused_name) is not None:
            continue  # a model without fused projections, or already fused
        parts = [getattr(mod, name, None) for name in names]
        qparts = [p for p in parts if isinstance(p, QuantLinear) and p.kernel == "generic"]
        if len(qparts) != len(names) or len({p.spec for p in qparts}) != 1:
            continue
        spec, k = qparts[0].spec, qparts[0].in_features
        cat = {s: torch.cat([getattr(p, s) for p in qparts]) for s in suffixes(spec.mode)}
        del parts, qparts
        setattr(mod, fused_name, QuantLinear.from_tensors(cat, spec, k))
        del cat
        for name in names:
            delattr(mod, name)
        n += 1
    return n


def prepare(model: nn.Module, own_kernels: bool = True) -> int:
    """QuantLinear.prepare on every quantized linear; returns how many there are."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in mods:
        m.prepare(own_kernels)
    return len(mods)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stage's weights: parameters plus quantized buffers (as the kernels hold them)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))


def tensor_bytes(name: str, shape: tuple[int, ...], elem_bytes: int, spec: QuantSpec | None) -> int:
    """Bytes a checkpoint tensor takes in a stage: float elements, or the quantized format's data and
    scales (int8: a byte per weight + an fp32 scale per row or an fp16 scale per group; int4: half a
    byte + fp16 scale and zero per group) for the linears quantization converts."""
    n = math.prod(shape)
    if spec is None or not is_quantizable(name):
        return n * elem_bytes
    spec = spec_for(name, spec)
    if spec.mode == "int8":
        return n + (2 * (n // spec.group) if spec.group else 4 * shape[0])
    return n // 2 + 4 * (n // spec.group)


# -- the quantization block of a checkpoint ---------------------------------------------------------


def source_quantization(source: Any) -> QuantSpec | None:
    """The `quantization` block of a native checkpoint's params.json, if any."""
    if getattr(source, "kind", "") != "native":
        return None
    params = Path(source.path) / "params.json"
    raw = json.loads(params.read_text())
    return QuantSpec.from_dict(raw["quantization"], str(params)) if "quantization" in raw else None


def resolve(source: Any, requested: QuantSpec | None, flag_given: bool) -> QuantSpec | None:
    """What a load quantizes to: the checkpoint's own quantization unless --quantize says otherwise,
    which is an error for a quantized checkpoint (its float weights are gone)."""
    stored = source_quantization(source)
    if stored is None:
        return requested
    if flag_given and requested != stored:
        want = requested.describe() if requested is not None else "none"
        raise ConfigError(
            f"{source.path} is quantized {stored.describe()} but --quantize asks for {want}; run it with "
            f"--quantize {stored.mode}{f' --group_size {stored.group}' if stored.group else ''} "
            f"(or leave --quantize out), or quantize the original float model"
        )
    return stored
