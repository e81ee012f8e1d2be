"""`python -m launch bench` and scripts/scaling.py: every field present and sane (no timing thresholds)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from launchers import REPO, torchrun

from launch.bench import Timing, kv_bytes_formula, make_prompts, random_stage, summarize
from model.args import ModelArgs
from model.checkpoint import expected_shapes

TINY = REPO / "configs" / "tiny.json"
TIMING_KEYS = ("ttft_s", "prefill_s", "prefill_tok_s", "decode_s", "decode_tok_s", "decode_ms_per_token", "total_s")
RANK_KEYS = ("rank", "layers", "n_layers", "threads", "weight_bytes", "streamed_bytes", "kv_bytes", "load_s",
             "base_rss_bytes", "loaded_rss_bytes", "peak_rss_bytes", "gpu_peak_bytes", "rss_budget_bytes",
             "rss_within_budget", "utilization")  # fmt: skip


def clean_env() -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env["PYTHONPATH"] = str(REPO)
    return env


def bench(*flags: object, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launch", "bench", *map(str, flags)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def report_of(stdout: str) -> dict[str, Any]:
    lines = [x for x in stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{stdout}"
    out: dict[str, Any] = json.loads(lines[0])
    return out


def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_timing(t: dict[str, Any], batch: int, prompt_len: int, new_tokens: int) -> None:
    for k in TIMING_KEYS:
        assert positive(t[k]), (k, t[k])
    assert t["ttft_s"] <= t["prefill_s"] <= t["total_s"]
    assert t["decode_s"] <= t["total_s"]  # also for medians over runs: each run's is bounded by its total
    assert t["generated_tokens"] == batch * new_tokens
    assert 0 < t["decode_tokens"] <= batch * (new_tokens - 1)
    assert t["prefill_tok_s"] == pytest.approx(batch * prompt_len / t["prefill_s"])
    assert t["decode_ms_per_token"] == pytest.approx(1000 * batch / t["decode_tok_s"])


def stage_weight_bytes(args: ModelArgs, layers: range, first: bool, last: bool, itemsize: int) -> int:
    names = [n for n in expected_shapes(args) if any(n.startswith(f"layers.{i}.") for i in layers)]
    names += ["tok_embeddings.weight"] * first + ["norm.weight", "output.weight"] * last
    return sum(math.prod(expected_shapes(args)[n]) for n in names) * itemsize


def check_report(r: dict[str, Any], batch: int, prompt_len: int, new_tokens: int, p: int, m: int,
                 splits: list[range]) -> None:  # fmt: skip
    args = ModelArgs.from_json(TINY)
    assert r["model_args"] == args.to_dict()
    assert (r["batch_size"], r["prompt_len"], r["new_tokens"]) == (batch, prompt_len, new_tokens)
    assert (r["num_pipeline_ranks"], r["num_microbatches"]) == (p, m)
    assert r["chunk_size"] == args.sliding_window and r["dtype"] == "float32" and r["device"] == "cpu"
    check_timing(r, batch, prompt_len, new_tokens)
    assert len(r["ranks"]) == p and [x["rank"] for x in r["ranks"]] == list(range(p))
    w = args.sliding_window
    assert w is not None
    for rk, layers in zip(r["ranks"], splits, strict=True):
        for k in RANK_KEYS:
            assert k in rk, k
        first, last = rk["rank"] == 0, rk["rank"] == p - 1
        assert rk["layers"] == [layers[0], layers[-1]] and rk["n_layers"] == len(layers)
        assert rk["threads"] == 1
        # KV bytes: K and V, per owned layer, W + 1 slots (the padding bin) of n_kv_heads x head_dim floats.
        kv = 2 * len(layers) * batch * (min(w, prompt_len + new_tokens) + 1) * args.n_kv_heads * args.head_dim * 4
        assert rk["kv_bytes"] == kv == kv_bytes_formula(args, len(layers), batch, prompt_len + new_tokens,
                                                        torch.float32)  # fmt: skip
        assert rk["weight_bytes"] == stage_weight_bytes(args, layers, first, last, 4)
        emb = args.vocab_size * args.dim * 4 if first else 0
        assert rk["streamed_bytes"] == rk["weight_bytes"] - emb
        assert (
            positive(rk["load_s"]) and positive(rk["base_rss_bytes"]) and rk["base_rss_bytes"] <= rk["peak_rss_bytes"]
        )
        assert rk["loaded_rss_bytes"] <= rk["peak_rss_bytes"] < 64 << 30
        assert rk["gpu_peak_bytes"] is None
        assert rk["rss_budget_bytes"] == int(1.15 * rk["weight_bytes"] + rk["kv_bytes"] + 0.5e9)
        assert rk["rss_within_budget"] == (rk["peak_rss_bytes"] <= rk["rss_budget_bytes"])
        bw = rk["bandwidth"]
        assert positive(bw["copy_gbs"]) and positive(bw["read_gbs"]) and positive(bw["buffer_bytes"])
    for x in (r, r["peers"]["naive"]):
        assert len(x["utilization"]) == p and all(0 < u <= 1 for u in x["utilization"])
    assert r["kv_bytes"] == sum(x["kv_bytes"] for x in r["ranks"])
    assert r["weight_bytes"] == stage_weight_bytes(args, range(args.n_layers), True, True, 4)
    assert r["peak_rss_bytes"] == [x["peak_rss_bytes"] for x in r["ranks"]]
    assert positive(r["decode_floor_ms_per_token"]) and positive(r["decode_vs_floor"])
    naive = r["peers"]["naive"]
    check_timing(naive, batch, prompt_len, new_tokens)
    for k, v in naive["vs_engine"].items():
        assert positive(v) and v == pytest.approx(naive[k] / r[k]), k
    mach = r["machine"]
    assert mach["cores"] >= 1 and mach["ram_bytes"] > 0 and mach["torch"] == torch.__version__ and mach["cpu"]


COMMON = ("--config", TINY, "--prompt_len", 20, "--new_tokens", 5, "--threads", 1, "--json", "--bandwidth",
          "--bandwidth_mb", 8, "--compare_naive", "--repeat", 2)  # fmt: skip


@pytest.mark.timeout(240)
def test_bench_one_process() -> None:
    r = bench(*COMMON, "--batch_size", 3, "--num_microbatches", 2)
    assert r.returncode == 0, r.stderr
    assert "[bench]" in r.stderr  # the progress line
    check_report(report_of(r.stdout), batch=3, prompt_len=20, new_tokens=5, p=1, m=2, splits=[range(4)])


@pytest.mark.timeout(300)
def test_bench_two_ranks_under_torchrun() -> None:
    proc = torchrun(2, ["-m", "launch", "bench", *map(str, COMMON), "--batch_size", "2", "--num_pipeline_ranks", "2"])
    out, err = proc.communicate(timeout=280)
    assert proc.returncode == 0, err
    check_report(report_of(out), batch=2, prompt_len=20, new_tokens=5, p=2, m=2, splits=[range(2), range(2, 4)])


@pytest.mark.timeout(240)
def test_bench_model_dir_and_table(tmp_path: Path) -> None:
    """A checkpoint directory instead of --config; the human-readable table instead of JSON."""
    model = tmp_path / "m"
    mk = subprocess.run([sys.executable, "-m", "launch", "make-checkpoint", model, "--config", TINY], cwd=REPO,
                        env=clean_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert mk.returncode == 0, mk.stderr
    r = bench(model, "--prompt_len", 8, "--new_tokens", 3, "--threads", 1, "--warmup", 0)
    assert r.returncode == 0, r.stderr
    for word in ("time to first token", "prefill", "decode", "KV cache", "peak RSS", "rank 0"):
        assert word in r.stdout


@pytest.mark.timeout(240)
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is an optional extra")
@pytest.mark.parametrize("config, dtype", [("tiny.json", "float32"), ("tiny-moe.json", "float32"),
                                           ("tiny.json", "bfloat16")])  # fmt: skip
def test_bench_compare_transformers(config: str, dtype: str) -> None:
    """bf16 covers the engine's packed oneDNN linears, unpacked again for transformers."""
    r = bench("--config", REPO / "configs" / config, "--prompt_len", 12, "--new_tokens", 6, "--batch_size", 2,
              "--threads", 1, "--json", "--compare_hf", "--dtype", dtype)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = report_of(r.stdout)
    assert rep["dtype"] == dtype
    hf = rep["peers"]["transformers"]
    check_timing(hf, 2, 12, 6)
    assert hf["version"]
    if dtype == "float32":
        assert hf["tokens_agree"] == 1.0  # same weights, greedy, fp32: the conversion is right
    assert 0 <= hf["tokens_agree"] <= 1
    assert all(positive(v) for v in hf["vs_engine"].values())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flags, message",
    [
        (("--config", TINY, "--compare_hf", "--num_pipeline_ranks", 2), "P = 1"),
        (("--config", TINY, "/some/model"), "not both"),
        ((), "--config"),
        (("--config", TINY, "--max_tokens", 5), "unrecognized arguments: --max_tokens"),
        (("--config", TINY, "--batch_size", 0), "--batch_size"),
        (("--config", "configs/nope.json"), "does not exist"),
    ],
)
def test_bench_bad_flags(flags: tuple[object, ...], message: str) -> None:
    r = bench(*flags, timeout=100)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_random_stage_is_the_same_for_any_split() -> None:
    args = ModelArgs.from_json(TINY)
    cpu = torch.device("cpu")
    whole = random_stage(args, list(range(4)), True, True, torch.float32, cpu, seed=3).state_dict()
    first = random_stage(args, [0, 1], True, False, torch.float32, cpu, seed=3).state_dict()
    last = random_stage(args, [2, 3], False, True, torch.bfloat16, cpu, seed=3).state_dict()
    assert set(first) | set(last) == set(whole)
    for k, v in first.items():
        assert torch.equal(v, whole[k]), k
    assert all(v.dtype == torch.bfloat16 for v in last.values())
    assert whole["layers.0.attention.wq.weight"].std().item() == pytest.approx(1 / math.sqrt(args.dim), rel=0.1)


def test_summarize_and_prompts() -> None:
    # two sequences: first tokens at 1.0 and 2.0, then one more each at 3.0 and 4.0
    t = summarize(0.0, {0: 1.0, 1: 2.0}, [1.0, 2.0, 3.0, 4.0], 4.0, batch=2, prompt_len=10)
    assert t == Timing(ttft_s=1.0, prefill_s=2.0, prefill_tok_s=10.0, decode_s=2.0, decode_tokens=2,
                       decode_tok_s=1.0, decode_ms_per_token=2000.0, total_s=4.0, generated_tokens=4)  # fmt: skip
    p = make_prompts(3, 7, 512)
    assert [len(x) for x in p] == [7, 7, 7] and all(x[0] == 1 and all(3 <= t < 512 for t in x[1:]) for x in p)
    assert p == make_prompts(3, 7, 512)


@pytest.mark.timeout(600)
def test_scaling_script_tiny_matrix(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("scaling", REPO / "scripts" / "scaling.py")
    assert spec is not None and spec.loader is not None
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nhand-written text stays\n")
    rows = scaling.main(["--config", str(TINY), "--P", "1,2", "--M", "1,2", "--batch", "2", "--prompt_len", "8",
                         "--new_tokens", "3", "--repeat", "1", "--device", "cpu", "--out", str(tmp_path),
                         "--md", str(md), "--naive"])  # fmt: skip
    with open(tmp_path / "tiny.csv") as f:
        table = list(csv.DictReader(f))
    cores = len(os.sched_getaffinity(0))
    # P=1 M=1, P=2 M=1, P=2 M=2, plus the single-stage reference (P=1, one rank's threads) on >1 core
    assert len(table) == len(rows) == 3 + (cores > 1)
    assert {(r["P"], r["M"]) for r in table} == {("1", "1"), ("2", "1"), ("2", "2")}
    for r in table:
        assert float(r["prefill_tok_s"]) > 0 and float(r["decode_tok_s"]) > 0 and int(r["kv_bytes"]) > 0
        if r["P"] == "2":
            assert float(r["prefill_eff"]) > 0 and 0 < float(r["prefill_ideal"]) <= 1
    for name in ("throughput_vs_P", "throughput_vs_M", "efficiency"):
        png = tmp_path / f"tiny_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in md.read_text()
    text = md.read_text()
    assert "hand-written text stays" in text and "| P | M | batch |" in text and "Machine:" in text
    again = scaling.main(["--replot", str(tmp_path / "tiny.csv"), "--out", str(tmp_path / "re"), "--name", "tiny"])
    assert [r["decode_tok_s"] for r in again] == pytest.approx([float(r["decode_tok_s"]) for r in table])
    assert (tmp_path / "re" / "tiny_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    scaling.write_section(md, "scaling:tiny", "replaced")  # a second run replaces the section, keeps the rest
    assert "hand-written text stays" in md.read_text() and "| P | M |" not in md.read_text()
