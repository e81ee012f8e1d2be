"""Train the tiny SentencePiece tokenizer shipped for random-weight test and demo models.

    python scripts/make_tokenizer.py configs/tokenizer-512.model

The model is BPE with byte fallback (any Unicode text round-trips through the 256 byte pieces),
Mistral's special ids (unk=0, bos=1, eos=2, no pad), no text normalisation, and a vocabulary of
exactly 512 pieces so that it matches ``vocab_size`` in configs/tiny*.json. Training uses one
thread and a corpus embedded below, so the output is the same file on every run.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 512
# The sentencepiece release that produced configs/tokenizer-512.model; others may train a different file.
MADE_WITH_SENTENCEPIECE = "0.2.3"

# Plain English written for this file: varied topics, punctuation, digits and capitals.
CORPUS = """\
The morning train to the coast was late again, so the station filled with people holding paper \
cups of coffee and looking at the board. A child asked her father why trains are always late \
on Mondays. He laughed and said that trains, like people, need a little time to wake up.

When you bake bread at home, the most important ingredient is patience. Mix the flour, water, \
salt and yeast, then leave the dough in a warm place for about two hours. It should double in \
size. Shape it gently, let it rest once more, and bake it at 230 degrees for 35 minutes.

The river runs north through the valley for nearly 120 kilometres before it reaches the sea. \
In spring the water is high and cold, carrying snow from the mountains; in late summer it is \
slow and clear, and you can see fish resting in the shade under the old stone bridge.

Computers do exactly what they are told, which is not always what we meant. A program is a \
list of instructions, and a bug is usually a place where the instructions and the intention \
disagree. Good tests make that disagreement visible early, while it is still cheap to fix.

She opened the letter slowly. "Dear Anna," it began, "I hope this finds you well. The garden \
is full of tomatoes this year, more than we could ever eat, and the cat has decided that the \
greenhouse belongs to her." Anna smiled, folded the page, and put the kettle on. It's a \
good year, she thought; we don't need to buy anything.

Good questions are often more useful than quick answers. Why does the moon look larger near \
the horizon? How do birds find their way south each autumn? What makes a song stay in your \
head all day? Each of these has a long history of careful thinking behind it.

The city council met on Tuesday, 14 March, to discuss the new library. After three hours of \
debate they agreed on a budget of 4.5 million, a site near the park, and an opening date in \
the autumn of next year. Several members asked for longer opening hours at weekends.

Learning a language takes time. At first every sentence is a puzzle, and you translate word \
by word. Later you begin to think in the new language, and one day you notice that you have \
understood a joke without trying. That small moment feels like a door opening.

Weather report: cloudy in the morning with light rain in the west, becoming brighter in the \
afternoon. Temperatures between 9 and 16 degrees. Winds from the south-west, strong at times \
near the coast. Tomorrow will be dry and sunny, though cooler overnight.

Our team builds tools that other people use every day, so we try to keep them simple, fast \
and honest about their limits. When something goes wrong, the error message should say what \
happened, where it happened, and what the reader can do about it next.

Notes from the workshop (version 2.0): use key=value pairs, e.g. size=64 & mode=fast; paths look \
like /home/user/data/*.txt or C:\\Users\\Kim; totals such as 7 + 8 = 15, 50% off, $19.99, #3, \
user@example.com, a_b | c, ~5 items, 2^10 = 1024, `code`, {braces}, (round) and <angle> brackets.

Quiet zebras jump over five lazy dogs. Vivid boxing wizards quickly jump. Pack my box with \
five dozen liquor jugs! Jackdaws love my big sphinx of quartz. XML, JSON, YAML, HTTP, USA, \
UK, NASA, BBC, FAQ, PDF, QR, RNG, VPN, OK, ZIP, EU, NATO: capitals appear in short forms too.

Chat prompts for instruction models are wrapped like this: [INST] Tell me a short story about \
a robot. [/INST] Once upon a time, a small robot named Pip learned to paint. [INST] What \
colour did it like best? [/INST] Pip liked blue, because it reminded it of the evening sky.
"""


def sentences() -> Iterator[str]:
    """One training sentence per non-empty line of the corpus (paragraphs are single lines)."""
    for line in CORPUS.splitlines():
        line = line.strip()
        if line:
            yield line


def train(vocab_size: int = VOCAB_SIZE) -> bytes:
    """Return the serialized SentencePiece model proto."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Like Mistral's own tokenizer: no normalisation, keep every space, add a dummy prefix.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return writer.getvalue()


def check(model: bytes, vocab_size: int) -> None:
    """Sanity checks on the trained model; raises AssertionError on failure."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.vocab_size() == vocab_size, sp.vocab_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    for text in ["héllo wörld 🙂 123", "日本語のテキスト", "  two  spaces\tand a tab\n", "Ω≈ç√∫"]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text, (text, sp.decode(ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="where to write the .model file")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)

    model = train(args.vocab_size)
    check(model, args.vocab_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(model)

    sp = spm.SentencePieceProcessor(model_proto=model)
    n_byte = sum(1 for i in range(sp.vocab_size()) if sp.is_byte(i))
    n_control = sum(1 for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i))
    print(
        f"wrote {args.output} ({len(model)} bytes): vocab {sp.vocab_size()} = {n_control} special + "
        f"{n_byte} byte + {sp.vocab_size() - n_control - n_byte} learned pieces"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
