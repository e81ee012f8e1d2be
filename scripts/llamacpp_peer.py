"""llama.cpp as the CPU peer for benchmarks: build it, write random-weights GGUFs of a config's shape, quantize, bench.

    python scripts/llamacpp_peer.py build [--dir /work/peers]
    python scripts/llamacpp_peer.py gguf --config configs/mistral-7b.json --out /work/peers/m7b-bf16.gguf
    python scripts/llamacpp_peer.py quantize /work/peers/m7b-bf16.gguf /work/peers/m7b-q4_0.gguf Q4_0
    python scripts/llamacpp_peer.py bench /work/peers/m7b-q4_0.gguf --threads 2 --prompt 32 --gen 64 --repeat 3

build:    downloads llama-cpp-python's sdist with pip (it vendors llama.cpp's full source) into DIR/src and builds
          llama-bench, llama-quantize and llama-simple into DIR/llama.cpp-build (Release, GGML_NATIVE, no curl;
          ~7 minutes on 2 cores). Does nothing when the binaries are already there.
gguf:     a llama-architecture GGUF of the shape of a params.json-style config, random weights (linears
          normal(0, 1/sqrt(in_features)), norms ones, embedding normal(0, 1)), a placeholder SentencePiece-style
          vocabulary, linears and embedding in --type (norms always F32). Tensors are generated and written one
          at a time, so a 7B file (14.5 GB in bf16) needs well under 1 GB of memory. llama.cpp's `llama`
          architecture has no sliding window: past sliding_window tokens it attends to everything.
quantize: llama-quantize IN OUT TYPE (Q8_0, Q4_0, ...; llama.cpp's own choices, e.g. a Q6_K output head for Q4_0).
bench:    llama-bench -o json, prefill (--prompt tokens) and decode (--gen tokens) timed separately, each after
          --depth tokens already in the cache (0: an empty cache; llama-bench's decode test does not follow its
          prefill test); prints one JSON line with medians over the repetitions and each repetition's decode
          ms/token in samples_ms.

Exit status 3 means "skipped": llama.cpp could not be built (no cmake, no download) or is not built yet.
Binaries are looked up in --bin-dir, else $LLAMACPP_BIN, else /work/peers/llama.cpp-build/bin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SDIST = "llama-cpp-python==0.3.36"
DEFAULT_DIR = Path("/work/peers")
TARGETS = ("llama-bench", "llama-quantize", "llama-simple")
SKIPPED = 3


class Skip(Exception):
    """llama.cpp is not available: the caller reports a skip (exit 3), not a failure."""


def bin_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("LLAMACPP_BIN"):
        return Path(os.environ["LLAMACPP_BIN"])
    return DEFAULT_DIR / "llama.cpp-build" / "bin"


def binary(name: str, bin_arg: str | None) -> Path:
    path = bin_dir(bin_arg) / name
    if not path.is_file():
        raise Skip(f"{path} not found: run `python scripts/llamacpp_peer.py build` first")
    return path


def run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run with a timeout; a timeout or a non-zero exit raises with the command's last output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{cmd[0]} timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-2000:]).strip()
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


# --- build ------------------------------------------------------------------------------------------------------


def source_dir(root: Path, timeout: float) -> Path:
    """llama.cpp's source from llama-cpp-python's sdist, downloaded and unpacked once under root/src."""
    src = root / "src"
    found = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    src.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(src)]
        try:
            run(cmd, timeout)
        except RuntimeError as e:
            raise Skip(f"pip download {SDIST} failed: {str(e).splitlines()[-1]}") from e
        tarballs = sorted(src.glob("llama_cpp_python-*.tar.gz"))
        if not tarballs:
            raise Skip(f"pip download {SDIST} left no sdist in {src}")
    with tarfile.open(tarballs[-1]) as tar:
        tar.extractall(src, filter="data")
    found = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise Skip(f"{tarballs[-1].name} has no vendor/llama.cpp")
    return found[-1].parent


def cmd_build(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    build = root / "llama.cpp-build"
    bins = build / "bin"
    targets = list(TARGETS if args.simple else TARGETS[:2])
    missing = [t for t in targets if not (bins / t).is_file()]
    if missing:
        if shutil.which("cmake") is None:
            raise Skip("cmake not found on PATH")
        t0 = time.time()
        src = source_dir(root, args.timeout)
        configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
        configure.append("-DLLAMA_CURL=OFF")
        try:
            run(configure, args.timeout)
            print(f"building {' '.join(missing)} with {args.jobs} jobs (~7 minutes on 2 cores)", file=sys.stderr)
            run(["cmake", "--build", str(build), "-j", str(args.jobs), "--target", *missing], args.timeout)
        except RuntimeError as e:
            raise Skip(f"cmake failed: {' | '.join(str(e).splitlines()[-3:])}") from e
        print(f"built in {time.time() - t0:.0f} s", file=sys.stderr)
    for t in targets:
        print(bins / t)
    return 0


# --- gguf -------------------------------------------------------------------------------------------------------


def load_config(path: Path) -> dict[str, Any]:
    raw = json.loads(path.read_text())
    need = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size")
    absent = [k for k in need if k not in raw]
    if absent:
        raise SystemExit(f"{path}: missing {', '.join(absent)}")
    cfg = dict(raw)
    cfg.setdefault("head_dim", raw["dim"] // raw["n_heads"])
    # Mistral 7B v0.1's params.json has no rope_theta and means 10000 (as model/args.py).
    if cfg.get("rope_theta") is None:
        cfg["rope_theta"] = 10000.0
    return cfg


def tensor_plan(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape (out, in), kind) in file order; kind: embedding, linear or norm."""
    dim, hd, hidden = cfg["dim"], cfg["head_dim"], cfg["hidden_dim"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    yield "token_embd.weight", (cfg["vocab_size"], dim), "embedding"
    for i in range(cfg["n_layers"]):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (dim,), "norm"
        yield b + "attn_q.weight", (q, dim), "linear"
        yield b + "attn_k.weight", (kv, dim), "linear"
        yield b + "attn_v.weight", (kv, dim), "linear"
        yield b + "attn_output.weight", (dim, q), "linear"
        yield b + "ffn_norm.weight", (dim,), "norm"
        yield b + "ffn_gate.weight", (hidden, dim), "linear"
        yield b + "ffn_up.weight", (hidden, dim), "linear"
        yield b + "ffn_down.weight", (dim, hidden), "linear"
    yield "output_norm.weight", (dim,), "norm"
    yield "output.weight", (cfg["vocab_size"], dim), "linear"


def placeholder_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: <unk> <s> </s>, the 256 byte tokens (as many as fit), then unique filler pieces."""
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"][:n]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL][:n]
    nbytes = max(0, min(256, n - len(tokens)))
    tokens += [f"<0x{b:02X}>" for b in range(nbytes)]
    types += [TokenType.BYTE] * nbytes
    fill = n - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(fill)]
    types += [TokenType.NORMAL] * fill
    scores = [0.0] * 3 + [0.0] * nbytes + [-float(i) for i in range(fill)]
    return tokens, scores[:n], [int(t) for t in types]


def cmd_gguf(args: argparse.Namespace) -> int:
    import gguf
    import torch

    cfg = load_config(Path(args.config))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bf16 = args.type == "bf16"
    lin_type = gguf.GGMLQuantizationType.BF16 if bf16 else gguf.GGMLQuantizationType.F32

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"random {Path(args.config).stem} seed {args.seed}")
    w.add_context_length(args.context_length)
    w.add_embedding_length(cfg["dim"])
    w.add_block_count(cfg["n_layers"])
    w.add_feed_forward_length(cfg["hidden_dim"])
    w.add_head_count(cfg["n_heads"])
    w.add_head_count_kv(cfg["n_kv_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = placeholder_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(min(1, cfg["vocab_size"] - 1))
    w.add_eos_token_id(min(2, cfg["vocab_size"] - 1))
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    plan = list(tensor_plan(cfg))
    total = 0
    for name, shape, kind in plan:
        n = int(np.prod(shape))
        if kind == "norm":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
            total += 4 * n
        elif bf16:
            w.add_tensor_info(name, shape, np.dtype(np.uint16), 2 * n, raw_dtype=lin_type)
            total += 2 * n
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
            total += 4 * n
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    gen = torch.Generator().manual_seed(args.seed)
    t0, done = time.time(), 0
    for name, shape, kind in plan:
        if kind == "norm":
            data = np.ones(shape, dtype=np.float32)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32)
            if kind == "linear":
                t.mul_(shape[1] ** -0.5)
            if bf16:
                data = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            else:
                data = t.numpy()
            del t
        w.write_tensor_data(data)
        done += data.nbytes
        del data
        if args.progress and name.endswith("ffn_down.weight"):
            print(f"{name}: {done / 1e9:.2f}/{total / 1e9:.2f} GB, {time.time() - t0:.0f} s", file=sys.stderr)
    w.close()
    size = out.stat().st_size
    print(
        json.dumps(
            {
                "out": str(out),
                "type": args.type,
                "bytes": size,
                "tensors": len(plan),
                "seconds": round(time.time() - t0, 1),
            }
        )
    )
    return 0


# --- quantize ---------------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    exe = binary("llama-quantize", args.bin_dir)
    t0 = time.time()
    cmd = [str(exe), args.input, args.output, args.type]
    if args.threads:
        cmd.append(str(args.threads))
    run(cmd, args.timeout)
    size = Path(args.output).stat().st_size
    print(json.dumps({"out": args.output, "type": args.type, "bytes": size, "seconds": round(time.time() - t0, 1)}))
    return 0


# --- bench ------------------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def cmd_bench(args: argparse.Namespace) -> int:
    exe = binary("llama-bench", args.bin_dir)
    cmd = [str(exe), "-m", args.model, "-t", str(args.threads), "-p", str(args.prompt), "-n", str(args.gen)]
    if args.depth:
        cmd += ["-d", str(args.depth)]
    cmd += ["-r", str(args.repeat), "-o", "json"]
    proc = run(cmd, args.timeout)
    rows = json.loads(proc.stdout)
    decode = [r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    prefill = [r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
    samples_ms: list[float] = []
    if decode:
        r = decode[0]
        samples_ms = [ns / 1e6 / r["n_gen"] for ns in r["samples_ns"]]
    prefill_ts = list(prefill[0]["samples_ts"]) if prefill else []
    model_type = rows[0].get("model_type", "") if rows else ""
    ms = median(samples_ms)
    result = {
        "model": args.model,
        "type": model_type.split()[-1] if model_type else None,
        "decode_ms_per_token": round(ms, 3) if ms is not None else None,
        "decode_tok_s": round(1000.0 / ms, 3) if ms else None,
        "prefill_tok_s": round(statistics.median(prefill_ts), 2) if prefill_ts else None,
        "samples_ms": [round(x, 3) for x in samples_ms],
        "prefill_samples_tok_s": [round(x, 2) for x in prefill_ts],
        "model_type": model_type,
        "model_bytes": rows[0].get("model_size") if rows else None,
        "threads": args.threads,
        "n_prompt": args.prompt,
        "n_gen": args.gen,
        "n_depth": args.depth,
        "repeat": args.repeat,
        "build_commit": rows[0].get("build_commit") if rows else None,
    }
    print(json.dumps(result))
    return 0


# --- cli --------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="download llama.cpp's source (pip sdist) and build its tools, if not built")
    b.add_argument("--dir", default=str(DEFAULT_DIR), help="sdist under DIR/src, build in DIR/llama.cpp-build")
    b.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    b.add_argument("--no-simple", dest="simple", action="store_false", help="build only llama-bench, llama-quantize")
    b.add_argument("--timeout", type=float, default=3600, help="seconds for each of download, configure, build")
    b.set_defaults(func=cmd_build)

    g = sub.add_parser("gguf", help="random-weights llama-architecture GGUF of a params.json-style config's shape")
    g.add_argument("--config", required=True, help="params.json-style config, e.g. configs/mistral-7b.json")
    g.add_argument("--out", required=True, help="GGUF file to write")
    g.add_argument("--type", choices=("bf16", "f32"), default="bf16", help="linears and embedding (norms are F32)")
    g.add_argument("--seed", type=int, default=0, help="torch generator seed: same seed, same weights")
    g.add_argument("--context-length", type=int, default=32768, help="llama.context_length in the file")
    g.add_argument("--progress", action="store_true", help="report after each layer on stderr")
    g.set_defaults(func=cmd_gguf)

    q = sub.add_parser("quantize", help="llama-quantize IN OUT TYPE (from a bf16/f32 GGUF)")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("type", help="llama.cpp type name: Q8_0, Q4_0, Q4_K_M, ...")
    q.add_argument("--threads", type=int, default=0, help="0: llama-quantize's default")
    q.add_argument("--bin-dir", help="folder with the llama.cpp binaries")
    q.add_argument("--timeout", type=float, default=3600, help="seconds before llama-quantize is killed")
    q.set_defaults(func=cmd_quantize)

    k = sub.add_parser("bench", help="llama-bench -o json: one JSON line with prefill and decode medians")
    k.add_argument("model", help="GGUF file")
    k.add_argument("--threads", type=int, default=2, help="llama-bench -t")
    k.add_argument("--prompt", type=int, default=32, help="prefill tokens (0: no prefill test)")
    k.add_argument("--gen", type=int, default=64, help="decoded tokens (0: no decode test)")
    k.add_argument("--repeat", type=int, default=3, help="repetitions (llama-bench -r); medians over them")
    k.add_argument("--depth", type=int, default=0,
                   help="tokens already in the cache when each test starts (llama-bench -d): decode at that context")
    k.add_argument("--bin-dir", help="folder with the llama.cpp binaries")
    k.add_argument("--timeout", type=float, default=3600, help="seconds before llama-bench is killed")
    k.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Skip as e:
        print(f"skipped: {e}")
        return SKIPPED
    except RuntimeError as e:  # a llama.cpp tool failed or timed out: its command and last output
        print(f"failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
