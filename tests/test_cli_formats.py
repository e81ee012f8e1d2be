"""Bad model sources through the command line on two ranks: each is one `error:` line on every
rank, exit 2 everywhere, no traceback and no output file (the ranks agree on the error first)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from launchers import slurm_style

from model.tokenizer import DEFAULT_TOKENIZER_PATH


def _hf_model(path: Path) -> Path:
    """A tiny sharded HF Mistral directory with the 512-piece SentencePiece tokenizer."""
    import transformers

    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512, sliding_window=8)
    torch.manual_seed(0)
    transformers.MistralForCausalLM(cfg).save_pretrained(path, max_shard_size="100KB")
    shutil.copyfile(DEFAULT_TOKENIZER_PATH, path / "tokenizer.model")
    return path


def _config(**changes: object) -> Callable[[Path], Path]:
    def edit(path: Path) -> Path:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps(cfg))
        return path
    return edit


def _drop_shard(path: Path) -> Path:
    sorted(path.glob("model-*.safetensors"))[1].unlink()
    return path


def _misname_shard(path: Path) -> Path:
    index = path / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    first = sorted(set(raw["weight_map"].values()))[0]
    raw["weight_map"] = {k: ("model-elsewhere.safetensors" if v == first else v) for k, v in raw["weight_map"].items()}
    index.write_text(json.dumps(raw))
    return path


@dataclass
class Case:
    id: str
    expect: tuple[str, ...]  # substrings of the error line
    make: Callable[[Path], Path]  # turns a copy of the good HF model into the bad input; returns the model path
    flags: tuple[str, ...] = ()


CASES = [
    Case("hf_missing_shard", ("which is missing",), _drop_shard),
    Case("hf_index_names_absent_file", ("model-elsewhere.safetensors", "missing"), _misname_shard),
    Case("hf_unsupported_architecture", ("Qwen2ForCausalLM", "not supported"),
         _config(architectures=["Qwen2ForCausalLM"], model_type="qwen2")),
    Case("hf_rope_scaling", ("rope_scaling", "yarn"), _config(rope_scaling={"type": "yarn", "factor": 4.0})),
]


def _run(case: Case, good: Path, root: Path) -> tuple[Case, Path, list[subprocess.CompletedProcess[str]]]:
    d = root / case.id
    d.mkdir()
    shutil.copytree(good, d / "model")
    model = case.make(d / "model")
    inp = d / "in.jsonl"
    inp.write_text(json.dumps({"tokens": [1, 5, 6, 7]}) + "\n")
    args = ["-m", "launch", "generate", str(model), "--input", str(inp), "--output", str(d / "out.jsonl"),
            "--num_pipeline_ranks", "2", "--max_tokens", "4", "--dist_timeout", "60", *case.flags]
    procs = slurm_style(2, [args, args])
    results = []
    for p in procs:
        out, err = p.communicate(timeout=150)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return case, d, results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, Path, list]]:
    root = tmp_path_factory.mktemp("bad-sources")
    good = _hf_model(root / "good")
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda c: _run(c, good, root), CASES))
    return {c.id: (c, d, r) for c, d, r in done}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_source_is_one_line_on_every_rank(case_id: str, results: dict[str, tuple[Case, Path, list]]) -> None:
    case, d, ranks = results[case_id]
    for rank, r in enumerate(ranks):
        report = f"rank {rank}: exit {r.returncode}\nstderr:\n{r.stderr}"
        assert r.returncode == 2, report
        assert "Traceback" not in r.stderr, report
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, report
        assert all(w in errors[0] for w in case.expect), report
    assert not [p for p in d.rglob("out.jsonl*")], "output written"
