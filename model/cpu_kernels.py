"""CPU fast path: bf16 linear layers on oneDNN's pre-packed weight layout.

PyTorch's default bf16 matrix-vector product on CPU reaches ~18 GB/s of weight reads on this
kind of machine (2 cores, AVX512-BF16), well below the memory bandwidth; the same GEMM on a
weight re-laid out once by oneDNN (what inductor's freezing pass does) gives bit-identical
results 1.2-3x faster in decode. Parameter names do not change; the packed weight has the same
shape but an opaque layout, so a packed model is for inference only (do not save its state_dict).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


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
    if not _packing_available():
        return 0
    packed = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu":
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
    """Undo model.cpu_kernels.pack_linears in place (one tensor at a time): plain [out, in] weights
    that other code (transformers) can use. Returns how many were unpacked."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.is_mkldnn:
            mod.weight = nn.Parameter(mod.weight.detach().to_dense(), requires_grad=False)
            mod.__class__ = nn.Linear
            n += 1
    return n
