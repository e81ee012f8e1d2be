from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import sentencepiece as spm

from model.args import ConfigError
from model.tokenizer import DEFAULT_TOKENIZER_PATH, SentencePieceTokenizer, StreamDecoder, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "configs" / "tokenizer-512.model"

TEXTS = [
    "héllo wörld 🙂 123",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと emoji 🎉🚀 mixed with ASCII",
    "  leading spaces, double  spaces\tand a tab\nnew line ",
    "Ω≈ç√∫ — «quotes» … ½",
    "",
]


@pytest.fixture(scope="module")
def tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(ASSET)


@pytest.mark.timeout(60)
def test_asset_is_default_and_small() -> None:
    assert DEFAULT_TOKENIZER_PATH == ASSET
    assert ASSET.is_file()
    assert ASSET.stat().st_size < 64 * 1024


@pytest.mark.timeout(60)
def test_special_ids(tok: SentencePieceTokenizer) -> None:
    assert tok.n_words == 512
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.id_to_piece(0) == "<unk>"
    assert tok.id_to_piece(1) == "<s>"
    assert tok.id_to_piece(2) == "</s>"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert all(0 <= i < tok.n_words for i in ids)
    assert tok.decode(ids) == text
    no_bos = tok.encode(text, bos=False)
    assert no_bos == ids[1:]
    assert tok.decode(no_bos) == text
    # EOS (a control piece) decodes to nothing.
    assert tok.decode(ids + [tok.eos_id]) == text


@pytest.mark.timeout(60)
def test_unknown_characters_use_byte_fallback(tok: Tokenizer) -> None:
    ids = tok.encode("🙂", bos=False)
    assert tok.unk_id not in ids
    assert [tok.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


@pytest.mark.timeout(60)
def test_decode_out_of_range_id(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tok.decode([5, tok.n_words])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "names, expected",
    [
        (["tokenizer.model"], "tokenizer.model"),
        (["tokenizer.model.v3"], "tokenizer.model.v3"),
        (["tokenizer.model.v1"], "tokenizer.model.v1"),
        (["tokenizer.model.v1", "tokenizer.model.v3"], "tokenizer.model.v3"),
        (["tokenizer.model", "tokenizer.model.v3"], "tokenizer.model"),
        (["tokenizer.model.v7"], "tokenizer.model.v7"),
    ],
)
def test_file_name_fallbacks(tmp_path: Path, names: list[str], expected: str) -> None:
    for name in names:
        shutil.copy(ASSET, tmp_path / name)
    t = Tokenizer.from_dir(tmp_path)
    assert t.path == tmp_path / expected
    assert t.n_words == 512
    assert t.decode(t.encode("héllo")) == "héllo"


@pytest.mark.timeout(60)
def test_from_dir_accepts_str_and_file(tmp_path: Path) -> None:
    shutil.copy(ASSET, tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(str(tmp_path)).path == tmp_path / "tokenizer.model"
    assert Tokenizer.from_dir(ASSET).path == ASSET


@pytest.mark.timeout(60)
def test_missing_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_dir(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "tokenizer.model" in msg and "tokenizer.model.v3" in msg and "tokenizer.model.v1" in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.timeout(60)
def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="tokenizer.model") as info:
        Tokenizer.from_dir(missing)
    assert str(missing) in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model\n", bytes(range(256)) * 8])
def test_corrupt_tokenizer(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_dir(tmp_path)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    chunks = [stream.push(i) for i in ids]
    chunks.append(stream.flush())
    assert "".join(chunks) == tok.decode(ids) == text
    assert stream.text == text
    # No chunk ever shows a half-decoded multi-byte character.
    assert all("\ufffd" not in c for c in chunks)


@pytest.mark.timeout(60)
def test_stream_decoder_holds_back_incomplete_bytes(tok: Tokenizer) -> None:
    ids = tok.encode("a€", bos=False)  # '€' is three byte-fallback pieces: E2 82 AC
    assert [tok.id_to_piece(i) for i in ids[-3:]] == ["<0xE2>", "<0x82>", "<0xAC>"]
    stream = StreamDecoder(tok)
    out = [stream.push(i) for i in ids]
    assert out[-3:] == ["", "", "€"]
    assert "".join(out) == "a€"
    assert stream.flush() == ""


@pytest.mark.timeout(60)
def test_stream_decoder_flushes_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok", bos=False) + [tok.encode("€", bos=False)[-3]]  # a lone 0xE2 lead byte
    stream = StreamDecoder(tok)
    out = "".join(stream.push(i) for i in ids)
    assert out == "ok"
    assert stream.flush() == "\ufffd"
    assert stream.text == tok.decode(ids)


@pytest.mark.timeout(60)
def test_instruct_format(tok: Tokenizer) -> None:
    assert tok.encode_instruct("Tell me a joke.") == tok.encode("[INST] Tell me a joke. [/INST]")
    ids = tok.encode_instruct("hi")
    assert ids[0] == tok.bos_id
    assert ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == "[INST] hi [/INST]"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tokenizer", ROOT / "scripts" / "make_tokenizer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_make_tokenizer_is_deterministic(tmp_path: Path) -> None:
    out = tmp_path / "tok.model"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tokenizer.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=50,
    )
    script = _load_script()
    assert out.read_bytes() == script.train(), "two training runs gave different files"
    if out.read_bytes() != ASSET.read_bytes():
        if spm.__version__ != script.MADE_WITH_SENTENCEPIECE:
            pytest.skip(
                f"sentencepiece {spm.__version__} trains a different file than "
                f"{script.MADE_WITH_SENTENCEPIECE} did; the shipped asset is still the reference"
            )
        pytest.fail(f"{ASSET} is stale: rerun python scripts/make_tokenizer.py {ASSET.relative_to(ROOT)}")
