"""The package's model against Hugging Face transformers' Mistral / Mixtral (independent code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common import CONFIGS, prompts, random_state, write_model
from hf_reference import build_hf_model

from distributed.pipeline import GenerationParams, Pipeline
from model.args import ModelArgs
from model.checkpoint import load_stage
from model.transformer import Transformer

pytestmark = pytest.mark.timeout(120)


def build(params: dict, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    state = random_state(params)
    model = Transformer(ModelArgs.from_dict(params))
    model.load_state_dict(state)
    return model.to(dtype).eval(), state


def full_logits(model: Transformer, tokens: list[int], chunk: int | None = None) -> torch.Tensor:
    """All-position logits [T, V], prefilling in chunks of `chunk` (one shot if None)."""
    args = model.args
    cache = model.make_cache(1, len(tokens) if args.sliding_window is None else min(args.sliding_window, len(tokens)))
    chunk = chunk or len(tokens)
    outs = []
    with torch.inference_mode():
        for s in range(0, len(tokens), chunk):
            ids = torch.tensor([tokens[s : s + chunk]])
            pos = torch.arange(s, s + ids.shape[1])[None]
            outs.append(model(ids, pos, cache)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    params = CONFIGS[name]
    model, state = build(params)
    hf = build_hf_model(params, state)
    for toks in prompts():
        ours = full_logits(model, toks)
        with torch.no_grad():
            ref = hf(torch.tensor([toks])).logits[0]
        assert ours.std() > 0.3  # not degenerate
        assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_prefill_equals_one_shot(name: str, chunk: int) -> None:
    model, _ = build(CONFIGS[name])
    toks = prompts(lengths=(33,))[0]
    assert (full_logits(model, toks, chunk) - full_logits(model, toks)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers_past_several_windows(name: str) -> None:
    params = CONFIGS[name]
    model, state = build(params)
    hf = build_hf_model(params, state)
    ps = prompts()
    ours = Pipeline(model, 0, 1, torch.device("cpu"), None).generate(ps, GenerationParams(max_tokens=30, eos_ids=()))
    for p, got in zip(ps, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
        assert len(set(got)) > 3  # a non-trivial continuation


@pytest.mark.parametrize("chunk", [None, 1, 3, 8, 100])
@pytest.mark.parametrize("microbatches", [1, 2, 3])
def test_batch_equals_one_by_one_for_any_chunk_and_microbatches(chunk: int | None, microbatches: int) -> None:
    model, _ = build(CONFIGS["moe"])
    pipe = Pipeline(model, 0, 1, torch.device("cpu"), None)
    ps = prompts(lengths=(5, 19, 33))
    alone = [pipe.generate([p], GenerationParams(max_tokens=25, eos_ids=()))[0] for p in ps]
    together = pipe.generate(ps, GenerationParams(max_tokens=25, eos_ids=(), chunk_size=chunk,
                                                  num_microbatches=microbatches))
    assert together == alone


def test_eos_stops_and_is_excluded() -> None:
    model, _ = build(CONFIGS["dense"])
    pipe = Pipeline(model, 0, 1, torch.device("cpu"), None)
    p = prompts(1)[0]
    free = pipe.generate([p], GenerationParams(max_tokens=20, eos_ids=()))[0]
    eos = free[5]  # pretend the 6th generated token is EOS
    stopped = pipe.generate([p], GenerationParams(max_tokens=20, eos_ids=(eos,)))[0]
    assert stopped == free[: free.index(eos)]


def test_cache_memory_bounded_by_window() -> None:
    model, _ = build(CONFIGS["dense"])
    cache = model.make_cache(2, 8)
    assert cache.k[0].shape == (2, 9, 2, 16)  # W + 1 slots: W for keys, one write-only bin


def test_bf16_runs_and_stays_close_to_fp32() -> None:
    model32, _ = build(CONFIGS["dense"])
    model16, _ = build(CONFIGS["dense"], torch.bfloat16)
    toks = prompts(lengths=(33,))[0]
    a, b = full_logits(model32, toks), full_logits(model16, toks)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    # bf16 has 8 bits of mantissa: close, not equal; the top token mostly agrees.
    assert (a - b).abs().max().item() < 0.25 * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.8


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_checkpoint_formats_load_the_same_model(tmp_path: Path, fmt: str) -> None:
    params = CONFIGS["moe"]
    write_model(tmp_path / fmt, params, fmt=fmt)
    loaded = load_stage(tmp_path / fmt)
    ref, _ = build(params)
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_stage_loads_only_its_tensors(tmp_path: Path) -> None:
    write_model(tmp_path, CONFIGS["dense"])
    stage = load_stage(tmp_path, layers=[2, 3], first=False, last=True)
    names = set(stage.state_dict())
    assert stage.tok_embeddings is None and "output.weight" in names
    assert not any(n.startswith(("layers.0.", "layers.1.")) for n in names)


def test_one_file_ref_agrees_with_package(tmp_path: Path) -> None:
    import one_file_ref

    for name in ("dense", "moe"):
        write_model(tmp_path / name, CONFIGS[name])
        pipe = Pipeline(load_stage(tmp_path / name), 0, 1, torch.device("cpu"), None)
        ps = prompts()
        assert pipe.generate(ps, GenerationParams(max_tokens=20, eos_ids=())) == one_file_ref.generate(
            str(tmp_path / name), ps, 20, eos_id=None
        )


def test_rope_theta_defaults() -> None:
    base = {k: v for k, v in CONFIGS["dense"].items() if k not in ("rope_theta", "sliding_window")}
    assert ModelArgs.from_dict(dict(base, sliding_window=4096)).theta == 10000.0
    assert ModelArgs.from_dict(base).theta == 1e6
    assert ModelArgs.from_dict(dict(base, rope_theta=5.0)).theta == 5.0


def test_packed_bf16_linears_give_identical_logits() -> None:
    from model.cpu_kernels import PackedLinear, pack_linears, packing_error

    plain, _ = build(CONFIGS["moe"], torch.bfloat16)
    packed, _ = build(CONFIGS["moe"], torch.bfloat16)
    n = pack_linears(packed)
    if n == 0:
        pytest.skip(f"no oneDNN bf16 packing here: {packing_error()}")
    assert all(type(m) is PackedLinear for m in packed.modules() if isinstance(m, torch.nn.Linear))
    toks = prompts(lengths=(33,))[0]
    assert torch.equal(full_logits(plain, toks, 8), full_logits(packed, toks, 8))
