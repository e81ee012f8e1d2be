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


def _truncated_gguf(path: Path) -> Path:
    gguf = path / "model.gguf"
    with open(gguf, "r+b") as f:
        f.truncate(gguf.stat().st_size - 100)
    return gguf


def _unknown_type_gguf(path: Path) -> Path:
    from test_gguf import patch_type

    patch_type(path / "model.gguf", "blk.1.attn_q.weight", 99)
    return path / "model.gguf"


def _adapter(module: str, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> Callable[[Path], Path]:
    """A PEFT adapter directory beside the model (returned: the model; the adapter goes in --lora)."""
    def make(path: Path) -> Path:
        from safetensors.torch import save_file

        d = path.parent / "adapter"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [module.rsplit(".", 1)[-1]],
            "bias": "none"}))
        key = f"base_model.model.model.layers.0.{module}"
        save_file({f"{key}.lora_A.weight": torch.ones(a_shape), f"{key}.lora_B.weight": torch.ones(b_shape)},
                  str(d / "adapter_model.safetensors"))
        return path
    return make


@dataclass
class Case:
    id: str
    expect: tuple[str, ...]  # substrings of the error line
    make: Callable[[Path], Path]  # turns a copy of the good model folder into the bad input; returns the model path
    flags: tuple[str, ...] = ()
    base: str = "hf"  # which good model is copied: "hf" (a directory) or "gguf" (a folder holding model.gguf)


CASES = [
    Case("hf_missing_shard", ("which is missing",), _drop_shard),
    Case("hf_index_names_absent_file", ("model-elsewhere.safetensors", "missing"), _misname_shard),
    Case("hf_unsupported_architecture", ("Qwen2ForCausalLM", "not supported"),
         _config(architectures=["Qwen2ForCausalLM"], model_type="qwen2")),
    Case("hf_rope_scaling", ("rope_scaling", "yarn"), _config(rope_scaling={"type": "yarn", "factor": 4.0})),
    Case("gguf_truncated", ("truncated or corrupt",), _truncated_gguf, base="gguf"),
    Case("gguf_unknown_quantization", ("blk.1.attn_q.weight", "type id 99"), _unknown_type_gguf, base="gguf"),
    # the model's hidden size is 64: this adapter was made for a model of hidden size 96
    Case("lora_other_base", ("another base",), _adapter("self_attn.q_proj", (4, 96), (96, 4)),
         flags=("--lora", "{adapter}")),
    Case("lora_absent_module", ("fc1",), _adapter("mlp.fc1", (4, 64), (96, 4)), flags=("--lora", "{adapter}")),
]


def _run(case: Case, good: dict[str, Path], root: Path) -> tuple[Case, Path, list[subprocess.CompletedProcess[str]]]:
    d = root / case.id
    d.mkdir()
    shutil.copytree(good[case.base], d / "model")
    model = case.make(d / "model")
    if model.is_dir() and case.base == "gguf":
        model = model / "model.gguf"
    flags = [f.format(adapter=d / "adapter") for f in case.flags]
    inp = d / "in.jsonl"
    inp.write_text(json.dumps({"tokens": [1, 5, 6, 7]}) + "\n")
    args = ["-m", "launch", "generate", str(model), "--input", str(inp), "--output", str(d / "out.jsonl"),
            "--num_pipeline_ranks", "2", "--max_tokens", "4", "--dist_timeout", "60", *flags]
    procs = slurm_style(2, [args, args])
    results = []
    for p in procs:
        out, err = p.communicate(timeout=150)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return case, d, results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, Path, list]]:
    root = tmp_path_factory.mktemp("bad-sources")
    from test_gguf import write_gguf

    good = {"hf": _hf_model(root / "good-hf"), "gguf": root / "good-gguf"}
    good["gguf"].mkdir()
    write_gguf(good["gguf"] / "model.gguf", dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4,
                                                  n_kv_heads=2, norm_eps=1e-5, vocab_size=512, rope_theta=1e4))
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


@pytest.mark.timeout(60)
def test_good_sources_are_good(results: dict[str, tuple[Case, Path, list]]) -> None:
    """The unbroken models load (so each case fails for its own reason, not the fixture's)."""
    from model.checkpoint import load_stage
    from model.formats import open_source
    from model.formats.lora import LoraAdapter

    root = next(iter(results.values()))[1].parent
    for model in (root / "good-hf", root / "good-gguf" / "model.gguf"):
        load_stage(model)
    (root / "adapter-check").mkdir()
    _adapter("self_attn.q_proj", (4, 64), (64, 4))(root / "adapter-check" / "model")
    args = open_source(root / "good-hf").args
    load_stage(root / "good-hf", lora=LoraAdapter.load(root / "adapter-check" / "adapter", args, scale=2.0))
