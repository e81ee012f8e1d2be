"""one_file_ref against Hugging Face MistralForCausalLM / MixtralForCausalLM with the same random weights."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from hf_reference import build_hf_model, hf_greedy  # noqa: E402

import one_file_ref as ofr  # noqa: E402

BASE: dict[str, Any] = dict(
    dim=64, n_layers=4, hidden_dim=160, n_heads=4, n_kv_heads=2, norm_eps=1e-5, vocab_size=512
)
MOE: dict[str, Any] = dict(num_experts=4, num_experts_per_tok=2)
CONFIGS: dict[str, dict[str, Any]] = {
    # no head_dim (defaults to dim // n_heads), window 8, no rope_theta (defaults to 10000 with a window)
    "dense_window": dict(BASE, sliding_window=8),
    "moe_window": dict(BASE, head_dim=16, sliding_window=8, rope_theta=1e6, moe=MOE),
    # head_dim != dim // n_heads, no window, rope_theta defaults to 1e6
    "moe_no_window_hd24": dict(BASE, head_dim=24, moe=MOE),
}
MAX_TOKENS = 20


def random_weights(params: dict, seed: int = 0) -> dict[str, Tensor]:
    """Mistral-native tensors with a scale that gives spread-out logits (std ~1.6) and peaked attention."""
    g = torch.Generator().manual_seed(seed)
    dim, vocab, hidden = params["dim"], params["vocab_size"], params["hidden_dim"]
    head_dim = params.get("head_dim") or dim // params["n_heads"]
    q_out, kv_out = params["n_heads"] * head_dim, params["n_kv_heads"] * head_dim

    def rand(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"tok_embeddings.weight": rand(vocab, dim, std=1.0), "norm.weight": 1 + rand(dim, std=0.1),
          "output.weight": rand(vocab, dim, std=0.2)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rand(q_out, dim, std=0.1)
        sd[p + "attention.wk.weight"] = rand(kv_out, dim, std=0.1)
        sd[p + "attention.wv.weight"] = rand(kv_out, dim, std=0.1)
        sd[p + "attention.wo.weight"] = rand(dim, q_out, std=0.1)
        sd[p + "attention_norm.weight"] = 1 + rand(dim, std=0.1)
        sd[p + "ffn_norm.weight"] = 1 + rand(dim, std=0.1)
        moe = params.get("moe")
        prefixes = [f"{p}feed_forward.experts.{e}." for e in range(moe["num_experts"])] if moe else [
            f"{p}feed_forward."]
        if moe:
            sd[p + "feed_forward.gate.weight"] = rand(moe["num_experts"], dim, std=0.2)
        for pre in prefixes:
            sd[pre + "w1.weight"] = rand(hidden, dim, std=0.08)
            sd[pre + "w2.weight"] = rand(dim, hidden, std=0.08)
            sd[pre + "w3.weight"] = rand(hidden, dim, std=0.08)
    return sd


def write_model(model_dir: Path, params: dict, sd: dict[str, Tensor], fmt: str = "safetensors") -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "params.json").write_text(json.dumps(params))
    if fmt == "safetensors":
        save_file(sd, str(model_dir / "consolidated.safetensors"))
    else:
        torch.save(sd, model_dir / "consolidated.00.pth")


def prompts() -> list[list[int]]:
    tokens = torch.randint(3, BASE["vocab_size"], (30,), generator=torch.Generator().manual_seed(1)).tolist()
    return [tokens[:5], tokens[:17], tokens]  # + 20 generated tokens: runs past several windows of 8


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(name: str, tmp_path: Path) -> None:
    params = CONFIGS[name]
    sd = random_weights(params)
    write_model(tmp_path, params, sd)
    model = ofr.load(str(tmp_path))
    hf = build_hf_model(params, sd)
    tokens = prompts()[-1]

    ours = ofr.forward_logits(model, tokens)
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0]
    assert ours.shape == theirs.shape == (len(tokens), params["vocab_size"])
    assert ours.dtype == torch.float32
    # sanity: logits are spread out and the argmax moves, so the comparison is not vacuous
    assert ours.std(dim=-1).min() > 0.3
    assert len(set(ours.argmax(-1).tolist())) > len(tokens) // 2
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"
    # the directory-path form gives the same result
    assert torch.equal(ofr.forward_logits(str(tmp_path), tokens), ours)

    window = params.get("sliding_window")
    if window is not None:  # sanity: the window really changes late positions, and only those
        model.params.sliding_window = None
        no_window = model.logits(tokens)
        assert torch.equal(no_window[:window], ours[:window])
        assert (no_window[window:] - ours[window:]).abs().amax(-1).min() > 1e-2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf_generate(name: str, tmp_path: Path) -> None:
    params = CONFIGS[name]
    sd = random_weights(params)
    write_model(tmp_path, params, sd)
    hf = build_hf_model(params, sd)
    ps = prompts()
    expected = hf_greedy(hf, ps, MAX_TOKENS)
    assert all(len(set(e)) > 3 for e in expected)  # sanity: not one repeated token
    assert ofr.generate(str(tmp_path), ps, MAX_TOKENS, eos_id=None) == expected

    # eos: generation stops at the first eos and does not include it
    eos = expected[0][3]
    stop = expected[0].index(eos)
    assert ofr.generate(str(tmp_path), ps[:1], MAX_TOKENS, eos_id=eos) == [expected[0][:stop]]
    assert ofr.generate(str(tmp_path), ps[:1], 2, eos_id=None) == [expected[0][:2]]


@pytest.mark.timeout(120)
def test_pth_checkpoint_same_as_safetensors(tmp_path: Path) -> None:
    params = CONFIGS["moe_window"]
    sd = {k: v.to(torch.bfloat16) for k, v in random_weights(params).items()}  # stored bf16, computed fp32
    write_model(tmp_path / "st", params, sd)
    write_model(tmp_path / "pth", params, sd, fmt="pth")
    tokens = prompts()[1]
    a = ofr.forward_logits(str(tmp_path / "st"), tokens)
    assert a.dtype == torch.float32
    assert torch.equal(a, ofr.forward_logits(str(tmp_path / "pth"), tokens))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "one_file_ref", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=100)


@pytest.mark.timeout(120)
def test_cli(tmp_path: Path) -> None:
    params = dict(CONFIGS["dense_window"], vocab_size=80)  # the size of the tokenizer trained below
    write_model(tmp_path, params, random_weights(params))
    p = [1, 5, 9, 20, 33]

    r = run_cli(str(tmp_path), "--tokens", ",".join(map(str, p)), "--max_tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ",".join(map(str, ofr.generate(str(tmp_path), [p], 6)[0]))

    import sentencepiece

    buf = io.BytesIO()
    words = [f"w{i} x{i % 7} y{i % 13}" for i in range(300)]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(words), model_writer=buf, vocab_size=80,
                                             model_type="bpe", bos_id=1, eos_id=2, unk_id=0)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    r = run_cli(str(tmp_path), "--prompt", "w1 x1", "--max_tokens", "5")
    assert r.returncode == 0, r.stderr
    ids = ofr.generate(str(tmp_path), [[1] + sp.encode("w1 x1")], 5, eos_id=sp.eos_id())[0]
    assert r.stdout.rstrip("\n") == sp.decode(ids)

    # missing files: one line on stderr, exit code 2, no traceback
    (tmp_path / "tokenizer.model").unlink()
    for args in ([str(tmp_path / "nowhere"), "--tokens", "1,2"], [str(tmp_path), "--prompt", "hi"]):
        r = run_cli(*args)
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "consolidated.safetensors").unlink()
    r = run_cli(str(tmp_path), "--tokens", "1,2")
    assert r.returncode == 2 and "consolidated" in r.stderr and "Traceback" not in r.stderr
