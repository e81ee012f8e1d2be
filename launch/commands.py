"""What each command does on rank 0; the other ranks only serve the pipeline."""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

from distributed.pipeline import Pipeline
from launch.options import GenerateOptions, InteractiveOptions, RunOptions
from launch.runtime import Runtime, log
from model.args import ConfigError
from model.formats import open_source
from model.tokenizer import Message, StreamDecoder, Tokenizer

DEMO_PROMPTS = [
    "This is a test",
    "This is another great test",
    "This is a third test, mistral AI is very good at testing. ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


def read_input_text(path: Path, kind: str) -> str:
    """The --input file's text, or a one-line error (kind: what it should be saved as)."""
    if not path.exists():
        raise ConfigError(f"--input {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"--input {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--input {path} is not valid UTF-8 (byte {e.start}); save it as {kind}") from None


def read_jsonl(path: Path, tok: Tokenizer, instruct: bool) -> list[list[int]]:
    """Validate the whole file before anything runs; one-line errors name the line."""
    text = read_input_text(path, "UTF-8 JSONL")
    prompts: list[list[int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("tokens" in obj):
            raise ConfigError(f'{where} needs exactly one of "prompt" (text) or "tokens" (list of ids)')
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"]:
                raise ConfigError(f'{where}: "prompt" must be a non-empty string')
            prompts.append(tok.encode_instruct(obj["prompt"]) if instruct else tok.encode(obj["prompt"]))
        else:
            ids = obj["tokens"]
            if (
                not isinstance(ids, list)
                or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
            ):
                raise ConfigError(f'{where}: "tokens" must be a non-empty list of integer ids')
            bad = [t for t in ids if not 0 <= t < tok.n_words]
            if bad:
                raise ConfigError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {tok.n_words})")
            prompts.append(ids)
    return prompts


def check_vocab(tok: Tokenizer, pipeline: Pipeline) -> None:
    # A larger tokenizer gives ids the embedding lacks; a smaller one cannot decode every id the
    # model may generate. Mistral's own checkpoints always match exactly.
    vocab = pipeline.stage.model.args.vocab_size
    if tok.n_words != vocab:
        raise ConfigError(
            f"the tokenizer has {tok.n_words} pieces but the model's vocab_size is {vocab}; "
            "use the tokenizer that belongs to these weights"
        )


class Command:
    """prepare() runs on every rank before the error agreement; run() only on rank 0."""

    batch: int | None = None  # the most sequences a decode step carries (None: unknown)

    def __init__(self, rt: Runtime, model_dir: Path) -> None:
        self.rt, self.model_dir = rt, model_dir
        self.tok: Tokenizer | None = None

    def prepare(self) -> Pipeline:
        source = open_source(self.model_dir)
        if self.rt.rank == 0:
            self.tok = source.tokenizer()
        pipeline = self.rt.load(source, self.batch)
        if self.tok is not None:
            check_vocab(self.tok, pipeline)
        return pipeline

    def run(self, pipeline: Pipeline) -> None:
        raise NotImplementedError


class Demo(Command):
    batch = len(DEMO_PROMPTS)

    def run(self, pipeline: Pipeline) -> None:
        assert self.tok is not None
        tok, params = self.tok, self.rt.generation_params(self.tok.eos_ids)
        prompts = [tok.encode(p) for p in DEMO_PROMPTS]
        first: list[float] = []
        t0 = time.perf_counter()
        out = pipeline.generate(
            prompts, params, on_token=lambda b, t: first.append(time.perf_counter()) if not first else None
        )
        elapsed = time.perf_counter() - t0
        for text, ids in zip(DEMO_PROMPTS, out, strict=True):
            print(f"{text!r} -> {tok.decode(ids)!r}")
        n = sum(len(x) for x in out)
        ttft = (first[0] - t0) if first else elapsed
        print(
            f"\n{len(prompts)} prompts, {sum(len(p) for p in prompts)} prompt tokens, {n} generated tokens in "
            f"{elapsed:.2f} s: first token after {ttft * 1e3:.0f} ms, "
            f"{n / max(elapsed - ttft, 1e-9):.1f} tokens/s after it ({self.rt.n_stages} stage(s))"
        )


class Generate(Command):
    def __init__(self, rt: Runtime, model_dir: Path, opts: GenerateOptions) -> None:
        super().__init__(rt, model_dir)
        self.opts = opts
        self.batch = opts.batch_size
        self.prompts: list[list[int]] = []

    def prepare(self) -> Pipeline:
        if self.opts.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {self.opts.batch_size}")
        pipeline = super().prepare()
        if self.rt.rank == 0:
            assert self.tok is not None
            self.prompts = read_jsonl(Path(self.opts.input), self.tok, self.opts.instruct)
            out = Path(self.opts.output)
            if not out.parent.is_dir():
                raise ConfigError(f"--output {out}: directory {out.parent} does not exist")
            if out.is_dir():
                raise ConfigError(f"--output {out} is a directory; give a file name")
        return pipeline

    def run(self, pipeline: Pipeline) -> None:
        assert self.tok is not None
        params, bs = self.rt.generation_params(self.tok.eos_ids), self.opts.batch_size
        out = Path(self.opts.output)
        tmp = out.with_name(out.name + ".partial")
        t0, n = time.perf_counter(), 0
        with open(tmp, "w") as f:
            for i in range(0, len(self.prompts), bs):
                for ids in pipeline.generate(self.prompts[i : i + bs], params):
                    f.write(json.dumps({"tokens": ids, "text": self.tok.decode(ids)}) + "\n")
                    n += len(ids)
                log(
                    f"generate: {min(i + bs, len(self.prompts))}/{len(self.prompts)} prompts, {n} tokens, "
                    f"{time.perf_counter() - t0:.1f} s"
                )
        os.replace(tmp, out)  # the output appears whole or not at all


class Interactive(Command):
    batch = 1

    def __init__(self, rt: Runtime, model_dir: Path, opts: InteractiveOptions) -> None:
        super().__init__(rt, model_dir)
        self.instruct = opts.instruct

    def _read_line(self, pipeline: Pipeline, lines: queue.Queue[str | None]) -> str | None:
        # While the user thinks, keep the other ranks inside their receive timeout.
        interval = max(1.0, self.rt.opts.dist_timeout / 4)
        while True:
            try:
                return lines.get(timeout=interval)
            except queue.Empty:
                pipeline.keepalive()
            except KeyboardInterrupt:  # Ctrl-C at the prompt quits like Ctrl-D
                return None

    def run(self, pipeline: Pipeline) -> None:
        assert self.tok is not None
        tok = self.tok
        lines: queue.Queue[str | None] = queue.Queue()
        ready = threading.Event()  # prompt for the next line only once the last answer is printed

        def reader() -> None:
            while True:
                ready.wait()
                ready.clear()
                try:
                    line = input("> ")
                except (EOFError, OSError):
                    lines.put(None)
                    return
                lines.put(line)

        # input() blocks, so it runs in a thread while this one keeps the other ranks alive.
        threading.Thread(target=reader, daemon=True).start()
        history: list[Message] = []
        while True:
            ready.set()
            line = self._read_line(pipeline, lines)
            if line is None:
                print(file=sys.stderr)
                return
            if not line.strip():
                continue
            if not self.instruct:
                self._stream(pipeline, tok.encode(line))
                continue
            # A chat: every turn is sent with the conversation so far, through the chat template.
            history.append({"role": "user", "content": line})
            reply = self._stream(pipeline, tok.encode_chat(history))
            history.append({"role": "assistant", "content": reply})

    def _stream(self, pipeline: Pipeline, prompt: list[int]) -> str:
        assert self.tok is not None
        stream = StreamDecoder(self.tok)
        params = self.rt.generation_params(self.tok.eos_ids)
        pipeline.generate([prompt], params, on_token=lambda b, t: print(stream.push(t), end="", flush=True))
        print(stream.flush(), flush=True)
        return stream.text


def model_dir_of(opts: RunOptions) -> Path:
    if opts.model_dir is None:
        raise ConfigError(
            "give a model: a Mistral-native directory (params.json), a Hugging Face directory (config.json) "
            "or a .gguf file"
        )
    return Path(opts.model_dir)
