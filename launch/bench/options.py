"""The options of `python -m launch bench` and their checks."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from simple_parsing import field

from launch.options import RunOptions
from model.args import ConfigError


@dataclass
class BenchOptions(RunOptions):
    """Measure time to first token, prefill and decode throughput, peak memory per rank and KV-cache
    bytes, for a model directory or a config with random weights (--config, nothing on disk).
    Every run generates exactly --new_tokens tokens per prompt (no EOS stop)."""

    max_tokens: int = field(default=64, cmd=False)  # not a bench flag: --new_tokens says how many
    config: str | None = None  # params.json-style config (e.g. configs/tiny.json): random weights, built in memory
    batch_size: int = 1  # prompts generated together
    prompt_len: int = 64  # tokens per prompt (BOS + random ids)
    new_tokens: int = 32  # tokens generated per prompt
    # untimed runs first (2 new tokens each; all of them with --compile), so one-time set-up costs are not measured
    warmup: int = 1
    repeat: int = 1  # measured runs; each number reported is the median over them
    json: bool = False  # print one JSON object on stdout (rank 0) instead of the table
    compare_hf: bool = False  # also run Hugging Face transformers' generate in this process (P = 1 only)
    compare_naive: bool = False  # also run the naive schedule (M = 1, whole prompt in one chunk) in this job
    bandwidth: bool = False  # measure memory bandwidth per rank with a large copy; report the decode floor
    bandwidth_mb: int = 1024  # size of the buffer copied by --bandwidth, in MB
    init_seed: int = 0  # seed of the random weights built for --config
    quiet: bool = False  # no progress line on stderr
    # the checkpoint's separate wq/wk/wv and w1/w3 linears instead of the fused ones (before/after comparisons)
    separate_projections: bool = False


def add_bench_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "bench",
        help="measure latency, throughput and memory (optionally against peers)",
        description=BenchOptions.__doc__,
    )
    sp.add_arguments(BenchOptions, dest="opts")


def check_options(opts: BenchOptions) -> None:
    """The bench flags; the common run flags are the command line's (launch.cli.validate)."""
    if (opts.config is None) == (opts.model_dir is None):
        raise ConfigError("give either a model directory or --config <params.json> (random weights), not both")
    for name in ("batch_size", "prompt_len", "new_tokens", "repeat", "bandwidth_mb"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(opts, name)}")
    if opts.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {opts.warmup}")
    if opts.config is not None and opts.quantize not in (None, "none"):
        raise ConfigError(
            "--quantize needs a model directory: write the random model with make-checkpoint, then bench that "
            "directory with --quantize (or a `python -m launch quantize` copy of it)"
        )
    if opts.compare_hf and opts.num_pipeline_ranks != 1:
        raise ConfigError("--compare_hf runs transformers in the same process, which needs the whole model: use P = 1")
    if opts.compare_hf and importlib.util.find_spec("transformers") is None:
        raise ConfigError(
            "--compare_hf needs Hugging Face transformers, an optional extra: pip install 'transformers>=4.45' "
            "(or pip install -e '.[test]')"
        )
    if opts.compare_hf and opts.temperature > 0:
        raise ConfigError("--compare_hf compares greedy generation: leave --temperature at 0")
