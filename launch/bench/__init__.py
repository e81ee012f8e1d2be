"""`python -m launch bench`: how fast, how big, and against whom.

    python -m launch bench --config configs/tiny.json --batch_size 4 --new_tokens 32 --json
    torchrun --nproc-per-node 2 -m launch bench <model_dir> --num_pipeline_ranks 2 --threads 1

The model is either a checkpoint directory or a params.json-style config (`--config`) whose
stage is built with random weights in memory, each rank only its own share (nothing on disk).
Every generation runs with eos_ids=(), so each sequence produces exactly --new_tokens tokens.

Timing (rank 0, from the token callbacks of Pipeline.generate):
  ttft_s         start -> first token of any sequence
  prefill_s      start -> every sequence has its first token; prefill_tok_s = batch*prompt_len/prefill_s
  decode_tok_s   tokens that arrive after prefill_s, divided by the time from prefill_s to the end
  decode_ms_per_token  1000 * batch / decode_tok_s: the time between two tokens of one sequence
Memory (every rank): peak RSS (getrusage high-water mark, so it includes the interpreter and torch),
GPU peak allocated bytes on CUDA, the KV cache this rank allocated, and its weight bytes.

Layout: options.py (flags and their checks), stage.py (the model measured), measure.py (timings,
memory, bandwidth), run.py (the runs and the report object), report.py (the table), hf_peer.py
(transformers on the same tensors). The command line only dispatches here (launch.cli).

Peers, measured in the same job with the same model, prompts, threads and dtype:
  --compare_naive  the schedule of Mistral's reference implementation: one micro-batch (M = 1) and
                   the whole prompt in one chunk, so exactly one stage is busy at any time
  --compare_hf     Hugging Face transformers' generate (greedy, same prompts and token count), P = 1
                   only, on the same weight tensors (no second copy; wq/wk are permuted copies)
Each peer is reported with `vs_engine`: the peer's number divided by the engine's.

--bandwidth measures memory bandwidth on each rank (one rank at a time, with its own threads) by
copying a large buffer, and reports the decode floor: the bytes a decode step must stream (every
weight except the embedding table, which is only gathered) divided by that bandwidth.
"""

from launch.bench.measure import Timing, kv_bytes_formula, make_prompts, summarize
from launch.bench.options import BenchOptions, add_bench_parser
from launch.bench.run import run_bench
from launch.bench.stage import random_stage

__all__ = [
    "BenchOptions",
    "Timing",
    "add_bench_parser",
    "kv_bytes_formula",
    "make_prompts",
    "random_stage",
    "run_bench",
    "summarize",
]
