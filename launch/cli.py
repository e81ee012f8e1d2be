"""Entry point: parse the command line, set up the job, run, and turn errors into one line."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from simple_parsing import ArgumentParser

from distributed.p2p import PeerLost
from launch.commands import Command, Demo, Generate, Interactive, model_dir_of
from launch.options import (
    DemoOptions,
    GenerateOptions,
    InteractiveOptions,
    MakeCheckpointOptions,
    QuantizeOptions,
    RunOptions,
    ServeOptions,
)
from launch.perplexity import PerplexityOptions
from launch.runtime import Runtime, default_model, log
from model.args import ConfigError, ModelArgs

COMMANDS: dict[str, tuple[type, str]] = {
    "demo": (DemoOptions, "generate for a few built-in prompts and print timing"),
    "interactive": (InteractiveOptions, "type prompts, see tokens stream back"),
    "generate": (GenerateOptions, "prompts from a JSONL file to a JSONL file"),
    "serve": (ServeOptions, "OpenAI-compatible HTTP server with continuous batching"),
    "make-checkpoint": (MakeCheckpointOptions, "write a random-weights checkpoint from a config"),
    "perplexity": (PerplexityOptions, "perplexity on a text file (windows of --context tokens)"),
    "quantize": (QuantizeOptions, "write an int8 / int4 weight-only quantized checkpoint"),
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m launch",
        description="Pipeline-parallel inference for Mistral / Mixtral. Under torchrun give every rank "
        "the same command line, e.g.  torchrun --nproc-per-node 2 -m launch demo <model_dir> --num_pipeline_ranks 2",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=cls.__doc__)
        sp.add_arguments(cls, dest="opts")
    from launch.bench import add_bench_parser

    add_bench_parser(sub)
    return p


def validate(opts: RunOptions) -> None:
    """Flag checks that need no model: fail before any process group exists."""
    if opts.max_tokens < 0:
        raise ConfigError(f"--max_tokens must be >= 0, got {opts.max_tokens}")
    for flag in ("temperature", "top_p", "dist_timeout"):
        if not math.isfinite(getattr(opts, flag)):
            raise ConfigError(f"--{flag} must be a finite number, got {getattr(opts, flag)}")
    if opts.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {opts.temperature}")
    if not 0 < opts.top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {opts.top_p}")
    if opts.chunk_size is not None and opts.chunk_size < 1:
        raise ConfigError(f"--chunk_size must be >= 1, got {opts.chunk_size}")
    if opts.num_microbatches is not None and opts.num_microbatches < 1:
        raise ConfigError(f"--num_microbatches must be >= 1, got {opts.num_microbatches}")
    if opts.group_size is not None and (opts.group_size < 2 or opts.group_size % 2):
        raise ConfigError(f"--group_size must be an even number >= 2, got {opts.group_size}")


def make_checkpoint(opts: MakeCheckpointOptions) -> None:
    from model.checkpoint import make_random_checkpoint, parse_dtype
    from model.tokenizer import DEFAULT_TOKENIZER_PATH

    args = ModelArgs.from_json(opts.config)
    out = Path(opts.out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new directory")
    dtype = parse_dtype(opts.dtype)
    assert dtype is not None
    make_random_checkpoint(args, out, dtype=dtype, seed=opts.seed, fmt=opts.format, tokenizer=DEFAULT_TOKENIZER_PATH)
    log(f"wrote {out} ({opts.config}, {opts.dtype}, {opts.format})")


def quantize_checkpoint(opts: QuantizeOptions) -> None:
    from model.checkpoint import parse_dtype, write_quantized
    from model.formats import open_source
    from model.quant import QuantSpec

    out = Path(opts.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; choose a new directory")
    spec = QuantSpec(opts.quantize, opts.group_size)
    source = open_source(opts.model)
    write_quantized(source, out, spec, parse_dtype(opts.dtype), progress=log)
    size = (out / "consolidated.safetensors").stat().st_size
    log(f"wrote {out}: {spec.describe()}, {size / 1e9:.2f} GB of weights")


def run(name: str, opts: RunOptions) -> None:
    validate(opts)
    rt = Runtime.start(opts)
    try:
        if name in ("demo", "interactive") and opts.model_dir is None:
            model_dir, line = default_model()
            if rt.rank == 0:
                log(line)
        else:
            model_dir = model_dir_of(opts)
        cmd: Command
        if name == "demo":
            cmd = Demo(rt, model_dir)
        elif name == "generate":
            assert isinstance(opts, GenerateOptions)
            cmd = Generate(rt, model_dir, opts)
        elif name == "serve":
            try:
                from launch.server import Serve
            except ImportError as e:
                raise ConfigError(f"serve needs {e.name}: pip install -e '.[serve]'") from None
            assert isinstance(opts, ServeOptions)
            cmd = Serve(rt, model_dir, opts)
        else:
            assert isinstance(opts, InteractiveOptions)
            cmd = Interactive(rt, model_dir, opts)
        error = None
        try:
            pipeline = cmd.prepare()
        except ConfigError as e:
            error = str(e)
        rt.agree(error)
        if rt.rank == 0:
            # STOP is sent only after a clean run: after an error the other ranks learn of it from
            # the closed connection (or the timeout) instead of a half-finished request.
            cmd.run(pipeline)
            pipeline.shutdown()
        else:
            pipeline.serve()
        rt.report_memory(pipeline)
    finally:
        rt.close()


def run_guarded(fn: Callable[[], None]) -> None:
    """Run fn, turning the errors a user can cause or a lost peer into one line and an exit code."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except PeerLost as e:
        print(f"error: {e}. The job cannot continue without every stage.", file=sys.stderr, flush=True)
        os._exit(1)  # skip process-group teardown, which could wait on the dead peer
    except KeyboardInterrupt:
        print(f"\n[rank {rank}] interrupted", file=sys.stderr, flush=True)
        os._exit(130)


def main(argv: Sequence[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)

    def dispatch() -> None:
        if ns.command == "make-checkpoint":
            make_checkpoint(ns.opts)
        elif ns.command == "quantize":
            quantize_checkpoint(ns.opts)
        elif ns.command == "perplexity":
            from launch.perplexity import run_perplexity

            run_perplexity(ns.opts)
        elif ns.command == "bench":
            from launch.bench import run_bench

            validate(ns.opts)  # the common run flags; bench checks its own
            run_bench(ns.opts)
        else:
            run(ns.command, ns.opts)

    run_guarded(dispatch)
