"""P stages over gloo: tokens identical to one process and to transformers, for any P, M, chunk."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from common import CONFIGS, prompts, random_state, write_model
from hf_reference import build_hf_model, hf_greedy
from launchers import REPO, base_env, torchrun

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
    greedy = pipe.generate(PROMPTS, GenerationParams(max_tokens=MAX_TOKENS, eos_ids=()))
    sampled = pipe.generate(PROMPTS, GenerationParams(
        max_tokens=MAX_TOKENS, eos_ids=(), sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7)))
    return {"greedy": greedy, "sampled": sampled}


def transformers_greedy(name: str) -> list[list[int]]:
    return hf_greedy(build_hf_model(CONFIGS[name], random_state(CONFIGS[name])), PROMPTS, MAX_TOKENS)


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
    assert len(got) == 3 * 3 + 3 + 2 * 2  # M = 1, 2, 4 x chunks; sampled; M = 2, 4 with decode M = 1


@pytest.mark.parametrize("lanes,decode", [(3, 1), (1, 3), (2, 4)])
def test_decode_micro_batches_apart_from_prefill_give_the_same_tokens(model: tuple[str, Path, dict], lanes: int,
                                                                      decode: int) -> None:
    """A static batch re-cut into other lanes once every prompt is prefilled (one process)."""
    _, path, ref = model
    pipe = Pipeline(load_stage(path), 0, 1, torch.device("cpu"), None)
    params = GenerationParams(max_tokens=MAX_TOKENS, eos_ids=(), num_microbatches=lanes, decode_microbatches=decode)
    assert pipe.generate(PROMPTS, params) == ref["greedy"]
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    assert pipe.generate(PROMPTS, replace(params, sampling=sampled)) == ref["sampled"]


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


def run_cli(args: list[str], stages: int, stdin: str | None = None) -> tuple[int, str, str]:
    """`python -m launch ...` as one process or under torchrun with `stages` ranks."""
    if stages == 1:
        r = subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, env=base_env(), input=stdin,
                           capture_output=True, text=True, timeout=100)
        return r.returncode, r.stdout, r.stderr
    proc = torchrun(stages, ["-m", "launch", *args, "--num_pipeline_ranks", str(stages)],
                    stdin=None if stdin is None else subprocess.PIPE)
    out, err = proc.communicate(input=stdin, timeout=100)
    return proc.returncode, out, err


@pytest.mark.timeout(240)
def test_cli_generate_and_interactive_under_torchrun(model: tuple[str, Path, dict], tmp_path: Path) -> None:
    """Rank 0 writes generate's file and streams interactive's tokens; the other rank follows and
    quitting (EOF) ends every rank cleanly with the same text as one process."""
    _, path, _ = model
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in PROMPTS))
    outputs = {}
    for stages in (1, 2):
        out = tmp_path / f"out{stages}.jsonl"
        rc, _, err = run_cli(["generate", str(path), "--input", str(inp), "--output", str(out),
                              "--max_tokens", "12"], stages)
        assert rc == 0, err[-2000:]
        rc, stdout, err = run_cli(["interactive", str(path), "--max_tokens", "12"], stages,
                                  stdin="Once upon a time\nThe sea\n")
        assert rc == 0, err[-2000:]
        outputs[stages] = (out.read_text(), stdout)
    assert outputs[1] == outputs[2]
    assert len(outputs[2][0].splitlines()) == len(PROMPTS)
    assert outputs[2][1].count("> ") >= 2  # two answers streamed, then the prompt for the next
