"""P stages over gloo: tokens identical to one process and to transformers, for any P, M, chunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from common import CONFIGS, prompts, random_state, write_model
from hf_reference import build_hf_model
from launchers import torchrun

from distributed.pipeline import GenerationParams, Pipeline
from model.checkpoint import load_stage
from model.sampling import SamplingParams

MAX_TOKENS = 20
PROMPTS = prompts(lengths=(5, 19, 33, 12))


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    """A checkpoint, and the tokens one process and transformers give for it (computed once)."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    write_model(path, CONFIGS[name])
    ref = single_process(path)
    assert ref["greedy"] == transformers_greedy(name)
    assert ref["sampled"] != ref["greedy"]  # the sampler really sampled
    return name, path, ref


def single_process(path: Path) -> dict[str, list[list[int]]]:
    pipe = Pipeline(load_stage(path), 0, 1, torch.device("cpu"), None)
    greedy = pipe.generate(PROMPTS, GenerationParams(max_tokens=MAX_TOKENS, eos_id=None))
    sampled = pipe.generate(PROMPTS, GenerationParams(
        max_tokens=MAX_TOKENS, eos_id=None, sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7)))
    return {"greedy": greedy, "sampled": sampled}


def transformers_greedy(name: str) -> list[list[int]]:
    hf = build_hf_model(CONFIGS[name], random_state(CONFIGS[name]))
    out = []
    for p in PROMPTS:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_pipeline_matches_single_process_and_transformers(model: tuple[str, Path, dict], stages: int,
                                                          tmp_path: Path) -> None:
    _, path, ref = model
    out = tmp_path / "out.json"
    proc = torchrun(stages, ["tests/pipeline_worker.py", str(path), "--out", str(out),
                             "--prompts", json.dumps(PROMPTS), "--max_tokens", str(MAX_TOKENS)])
    _, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out.read_text())
    for key, tokens in got.items():
        assert tokens == (ref["greedy"] if key.startswith("greedy") else ref["sampled"]), key
    assert len(got) == 3 * 3 + 3


@pytest.mark.timeout(120)
def test_uneven_layer_split(model: tuple[str, Path, dict], tmp_path: Path) -> None:
    _, path, ref = model
    out = tmp_path / "out.json"
    proc = torchrun(2, ["tests/pipeline_worker.py", str(path), "--out", str(out), "--prompts", json.dumps(PROMPTS),
                        "--max_tokens", str(MAX_TOKENS), "--layer_split", "3,1", "--microbatches", "2",
                        "--chunks", "0"])
    _, err = proc.communicate(timeout=100)
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out.read_text())
    assert got["greedy m=2 c=0"] == ref["greedy"]
