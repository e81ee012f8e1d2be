"""`python -m launch perplexity <model> --input text.txt [--context N] [--json]`: llama.cpp's
llama-perplexity for this engine.

The text is tokenized once (no BOS of its own) and cut into windows of N tokens; each window is run
from an empty cache (the first token replaced by BOS where the tokenizer adds one, as llama.cpp does)
and the negative log-likelihood of each token of its second half is taken from the logits of the
token before it, so every scored token sees at least N/2 tokens of context. Perplexity =
exp(mean NLL over every scored token).

Under torchrun every stage runs its layers on each chunk of each window and sends the activations on
(Links, the same messages as generation); the last stage scores. The stages are not driven by the
generation schedule (distributed/pipeline.py): stage 0 simply streams all windows, so the stages work
on consecutive chunks at once. The totals go from the last rank to every rank over the control group.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from simple_parsing import field

from distributed.pipeline import Pipeline
from launch.commands import read_input_text
from launch.options import RunOptions
from launch.runtime import Runtime, log
from model.args import ConfigError
from model.cache import cache_capacity
from model.formats import open_source

DEFAULT_CHUNK_NO_WINDOW = 1024


@dataclass
class PerplexityOptions(RunOptions):
    """Perplexity of a model on a text file (llama.cpp's llama-perplexity): windows of --context
    tokens, the mean negative log-likelihood of each window's second half."""

    input: str = field(default="", required=True)  # UTF-8 text file
    context: int = 512  # tokens per window (the second half of each is scored)
    max_windows: int | None = None  # score only the first N windows (unset: every full window)
    json: bool = False  # print one JSON object (perplexity, tokens, ...) on stdout instead of a line


def read_tokens(opts: PerplexityOptions, tok: Any) -> list[int]:
    path = Path(opts.input)
    text = read_input_text(path, "UTF-8")
    ids = list(tok.encode(text, bos=False))
    if len(ids) < opts.context:
        raise ConfigError(
            f"--input {path} has {len(ids)} tokens, fewer than one window of --context {opts.context}; "
            "give a longer text or a smaller --context"
        )
    return ids


def windows(tokens: list[int], context: int, bos: int | None, limit: int | None) -> list[list[int]]:
    n = len(tokens) // context
    out = [tokens[i * context : (i + 1) * context] for i in range(n if limit is None else min(n, limit))]
    return [([bos] + w[1:]) if bos is not None else w for w in out]


@torch.inference_mode()
def score(pipeline: Pipeline, wins: list[list[int]], chunk: int) -> tuple[float, int]:
    """This rank's part of the scoring; the last stage returns (sum of NLL, tokens scored), the
    others (0, 0)."""
    model, links = pipeline.stage.model, pipeline.links
    args = model.args
    dtype = next(model.parameters()).dtype
    device = pipeline.device
    nll, count = 0.0, 0
    for w in wins:
        n = len(w)
        cache = model.make_cache(1, cache_capacity(args.sliding_window, n))
        logits: list[torch.Tensor] = []
        for start in range(0, n, chunk):
            t = min(chunk, n - start)
            positions = torch.arange(start, start + t, device=device)[None]  # [1, T]
            if model.is_first:
                x = torch.tensor([w[start : start + t]], dtype=torch.long, device=device)  # [1, T]
            else:
                assert links is not None
                x = links.recv_tensor((1, t, args.dim), dtype)
            out = model(x, positions, cache)
            if not model.is_last:
                assert links is not None
                links.send_tensor(out)
            else:
                logits.append(out[0])  # [T, vocab] float32
        if model.is_last:
            lg = torch.cat(logits)  # [N, vocab]
            half = n // 2
            target = torch.tensor(w[half:], dtype=torch.long, device=device)  # tokens half .. N-1
            nll += float(F.cross_entropy(lg[half - 1 : n - 1].float(), target, reduction="sum"))
            count += n - half
    if links is not None:
        links.flush()
    return nll, count


def run_perplexity(opts: PerplexityOptions) -> None:
    from launch.cli import validate
    from launch.commands import model_dir_of

    validate(opts)
    if opts.context < 2:
        raise ConfigError(f"--context must be >= 2, got {opts.context}")
    if opts.max_windows is not None and opts.max_windows < 1:
        raise ConfigError(f"--max_windows must be >= 1, got {opts.max_windows}")
    rt = Runtime.start(opts)
    try:
        error, pipeline = None, None
        shared: list[Any] = [None, None]
        try:
            source = open_source(model_dir_of(opts))
            if rt.rank == 0:
                tok = source.tokenizer()
                shared = [read_tokens(opts, tok), tok.bos_id]
            pipeline = rt.load(source)
        except ConfigError as e:
            error = str(e)
        rt.agree(error)
        assert pipeline is not None
        if rt.control is not None:
            dist.broadcast_object_list(shared, src=0, group=rt.control)
        tokens, bos = shared
        assert isinstance(tokens, list)
        args = pipeline.stage.model.args
        chunk = opts.chunk_size or args.sliding_window or DEFAULT_CHUNK_NO_WINDOW
        wins = windows(tokens, opts.context, bos if isinstance(bos, int) else None, opts.max_windows)
        t0 = time.perf_counter()
        nll, count = score(pipeline, wins, chunk)
        totals = torch.tensor([nll, float(count)], dtype=torch.float64)
        if rt.control is not None:
            dist.broadcast(totals, src=rt.n_stages - 1, group=rt.control)
        seconds = time.perf_counter() - t0
        if rt.rank != 0:
            return
        nll, count = totals.tolist()
        ppl = math.exp(nll / count)
        report = {
            "perplexity": ppl,
            "tokens": int(count),
            "nll_per_token": nll / count,
            "windows": len(wins),
            "context": opts.context,
            "text_tokens": len(tokens),
            "seconds": seconds,
            "quantize": opts.quantize,
        }
        if opts.json:
            print(json.dumps(report), flush=True)
        else:
            print(f"perplexity {ppl:.4f} over {int(count)} tokens ({len(wins)} windows of {opts.context})")
        log(f"perplexity: {len(wins)} windows in {seconds:.1f} s ({len(wins) * opts.context / seconds:.0f} tokens/s)")
    finally:
        rt.close()
