"""Issue 12's decode paths give the same numbers as the plain model: fused projections (wq|wk|wv,
w1|w3) and torch.compile'd decode steps. Timings are benchmarks (docs/benchmarks.md), never tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import CONFIGS, chunked_logits, prompts, random_model, write_model
from launchers import REPO, base_env, torchrun

from distributed.pipeline import GenerationParams, Pipeline
from model.cpu_kernels import PackedLinear, pack_linears, packing_error
from model.layers import fuse_projections, rope_tables, rotary, unfuse_projections
from model.transformer import compile_bucket


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_fused_projections_give_identical_logits_and_unfuse_restores_names(name: str) -> None:
    plain, fused = random_model(name), random_model(name)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    n_ffn = sum(1 for m in fused.modules() if type(m).__name__ == "FeedForward")
    assert fuse_projections(fused) == len(fused.layers) + n_ffn
    names = set(fused.state_dict())
    assert any(k.endswith("attention.wqkv.weight") for k in names) and not any(".wq." in k for k in names)
    assert any(k.endswith("w13.weight") for k in names) and not any(".w1." in k for k in names)
    assert fuse_projections(fused) == 0  # idempotent
    toks = prompts(lengths=(20,))[0]
    assert torch.equal(chunked_logits(plain, toks, 6), chunked_logits(fused, toks, 6))
    unfuse_projections(fused)
    after = fused.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.timeout(60)
def test_fused_then_packed_bf16_equals_plain_bf16() -> None:
    plain, fast = random_model("dense", torch.bfloat16), random_model("dense", torch.bfloat16)
    fuse_projections(fast)
    if pack_linears(fast) == 0:
        pytest.skip(f"no oneDNN bf16 packing here: {packing_error()}")
    assert all(type(m) is PackedLinear for m in fast.modules() if isinstance(m, torch.nn.Linear))
    toks = prompts(lengths=(20,))[0]
    assert torch.equal(chunked_logits(plain, toks, 6), chunked_logits(fast, toks, 6))


@pytest.mark.timeout(30)
def test_real_rotary_equals_complex_rotary() -> None:
    pos = torch.tensor([[0, 5, 4095, -1], [7, 8, 9, 100000]])
    x = torch.randn(2, 4, 3, 16)
    complex_ = rotary(x, rope_tables(pos, 16, 1e6))
    real = rotary(x, rope_tables(pos, 16, 1e6, real=True))
    torch.testing.assert_close(real, complex_, rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(30)
def test_compile_bucket_is_a_valid_capacity() -> None:
    for window in (None, 16, 100, 4096):
        for cap in (1, 5, 16, 63, 64, 65, 100, 1000, 4096, 5000):
            need = cap if window is None else min(cap, window)
            got = compile_bucket(need, window)
            # A rolling cache is exact with W >= the longest sequence or W = the window.
            assert got >= need and (window is None or got <= window or got == need)
    assert compile_bucket(65, None) == 128 and compile_bucket(65, 100) == 100 and compile_bucket(10, None) == 64


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("name", "dtype", "microbatches"),
    [("dense", torch.float32, 1), ("dense", torch.bfloat16, 2), ("moe", torch.float32, 1)],
)
def test_compiled_decode_gives_the_eager_tokens(name: str, dtype: torch.dtype, microbatches: int) -> None:
    eager, compiled = random_model(name, dtype), random_model(name, dtype)
    for m in (eager, compiled):
        fuse_projections(m)
        pack_linears(m)  # bf16: the compiled step calls the packed kernel through a custom op
    compiled.compile_decode()
    # Lengths past the window (8): wrap-around; two lengths and M = 2: two row slices, padding.
    ps = prompts(lengths=(5, 19))
    params = GenerationParams(max_tokens=12, eos_ids=(), num_microbatches=microbatches)
    want = Pipeline(eager, 0, 1, torch.device("cpu"), None).generate(ps, params)
    got = Pipeline(compiled, 0, 1, torch.device("cpu"), None).generate(ps, params)
    assert got == want
    assert compiled.compile_seconds > 0  # the compile happened (and was timed)


@pytest.mark.timeout(420)
def test_compiled_two_stages_give_one_eager_process_tokens(tmp_path: Path) -> None:
    """--compile under torchrun, P = 2 (M = 2: two row slices per stage), against eager P = 1."""
    model_dir = write_model(tmp_path / "m", CONFIGS["dense"])
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in prompts(lengths=(5, 19))))
    common = ["-m", "launch", "generate", str(model_dir), "--input", str(inp), "--max_tokens", "12"]
    eager = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "eager.jsonl")], cwd=REPO,
                           env=base_env(), capture_output=True, text=True, timeout=180)  # fmt: skip
    assert eager.returncode == 0, eager.stderr
    job = torchrun(2, [*common, "--output", str(tmp_path / "compiled.jsonl"), "--num_pipeline_ranks", "2", "--compile"])
    _, err = job.communicate(timeout=360)
    assert job.returncode == 0, err
    assert (tmp_path / "compiled.jsonl").read_text() == (tmp_path / "eager.jsonl").read_text()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,group", [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 16)])
def test_compiled_decode_with_quantized_linears_gives_the_eager_tokens(tmp_path: Path, mode: str, group: int) -> None:
    """--compile with --quantize (CPU packed int8/int4 kernels inside the compiled step: int8 per
    channel and group-wise; int4 with a group size the kernel lacks dequantizes), through the command
    line, against the same quantization eager."""
    model_dir = write_model(tmp_path / "m", CONFIGS["dense"])
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in prompts(lengths=(5, 19))))
    outs = {}
    for flag in ("--nocompile", "--compile"):
        out = tmp_path / f"{flag}.jsonl"
        r = subprocess.run([sys.executable, "-m", "launch", "generate", str(model_dir), "--input", str(inp),
                            "--output", str(out), "--max_tokens", "12", "--quantize", mode,
                            *(["--group_size", str(group)] if group else []), "--dtype", "bfloat16", flag],
                           cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=240)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        outs[flag] = out.read_text()
    assert outs["--compile"] == outs["--nocompile"]
    assert all(len(json.loads(line)["tokens"]) > 0 for line in outs["--compile"].splitlines())
