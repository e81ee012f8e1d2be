"""The stage bench measures: loaded like every command, or random weights from a config."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

from distributed.partition import stage_layers
from distributed.pipeline import Pipeline
from launch.bench.options import BenchOptions
from launch.runtime import Runtime, log
from model.args import ConfigError, ModelArgs
from model.attention import get_backend
from model.checkpoint import parse_dtype
from model.cpu_kernels import prepare_cpu_linears, unpack_linears
from model.layers import fuse_projections, unfuse_projections
from model.transformer import Transformer


def random_stage(
    args: ModelArgs, layers: list[int], first: bool, last: bool, dtype: torch.dtype, device: torch.device, seed: int
) -> Transformer:
    """This rank's modules with random weights, allocated directly in `dtype` (no fp32 detour).
    Each tensor is seeded by its name, so every layout (any P, any split) builds the same model."""
    with torch.device("meta"):
        model = Transformer(args, layers, first, last).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            std = 1.0 if name == "tok_embeddings.weight" else 1.0 / math.sqrt(p.shape[1])
            p.normal_(0.0, std, generator=g)
    return model.eval()


def build_pipeline(rt: Runtime, opts: BenchOptions) -> tuple[Pipeline, str]:
    """The rank's stage from a model directory or from --config (random weights)."""
    if opts.config is None:
        assert opts.model_dir is not None
        from model.formats import open_source

        pipeline = rt.load(open_source(opts.model_dir), opts.batch_size)
        if opts.separate_projections:
            model = pipeline.stage.model
            unpack_linears(model)
            unfuse_projections(model)
            prepare_cpu_linears(model, opts.cpu_linear, rt.step_rows(opts.batch_size))
        return pipeline, str(opts.model_dir)
    path = Path(opts.config)
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist (see configs/ for presets)")
    args = ModelArgs.from_json(path)
    split = stage_layers(args.n_layers, rt.n_stages, opts.layer_split)
    if rt.rank == 0:
        spans = ", ".join(f"{x[0]}-{x[-1]}" for x in split)
        log(f"bench: {args.n_layers} layers over {len(split)} stage(s) (layers {spans}), random weights")
    dtype = parse_dtype(opts.dtype) or torch.float32
    model = random_stage(
        args, split[rt.rank], rt.rank == 0, rt.rank == rt.n_stages - 1, dtype, rt.device, opts.init_seed
    )
    model.attention = get_backend(opts.attention, rt.device)
    if not opts.separate_projections:
        fuse_projections(model)  # as Runtime.load does: fused q|k|v and w1|w3, then
    # CPU bf16 linears as Runtime.load lays them out (the blocked AVX512-BF16 kernel or oneDNN's packing)
    done = prepare_cpu_linears(model, opts.cpu_linear, rt.step_rows(opts.batch_size))
    if done and rt.rank == 0:
        log(f"bench: {done}")
    if opts.compile:
        model.compile_decode()
    from distributed.p2p import Links

    links = Links(rt.rank, rt.n_stages, rt.device) if rt.n_stages > 1 else None
    return Pipeline(model, rt.rank, rt.n_stages, rt.device, links), f"{path} (random weights)"
