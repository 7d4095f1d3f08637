"""``meshplan data prepare``: documents tokenized exactly as ``tokenizers`` does, EOS between them, a stable
evaluation split, the dtype recorded beside the file, and every bad input refused in one line with nothing
half-written."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import regex
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.errors import InputError
from meshplan.launcher import prepare as prep
from meshplan.launcher.checks import token_file_dtype

TEXTS = [
    "The planner picks data, tensor and pipeline degrees.",
    "Ünïcödé text, emoji 🚀 and   runs of   spaces\n\n\nnewlines",
    "A document that spells <|endoftext|> inside its text is still one document.",
    "def f(x):\n    return x ** 2  # code, too",
    "numbers 12345 and 3.14159, punctuation!?",
]


def _byte_level(path: Path, vocab: int = 600) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(path))
    return path


def _word_level(path: Path) -> Path:
    words = sorted({w for t in TEXTS for w in t.split()})
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def _corpus(tmp_path: Path, documents: int = 200) -> Path:
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(documents):
            f.write(json.dumps({"text": f"{TEXTS[i % len(TEXTS)]} #{i}"}) + "\n")
    return path


def _documents(ids: np.ndarray, eos: int) -> list[list[int]]:
    cut = np.flatnonzero(ids == eos)
    assert cut.size and cut[-1] == len(ids) - 1          # every document ends with EOS
    return [part.tolist() for part in np.split(ids, cut + 1)[:-1]]


@pytest.mark.parametrize("kind", ["byte-level", "word-level"])
def test_tokens_are_the_tokenizers_and_the_split_is_stable(tmp_path, kind):
    tokenizer_path = (_byte_level if kind == "byte-level" else _word_level)(tmp_path / "tokenizer.json")
    corpus = _corpus(tmp_path)
    config = prep.PrepareConfig(tokenizer=tokenizer_path, inputs=(corpus,), out=tmp_path / "train.bin",
                                eval_out=tmp_path / "eval.bin", eval_fraction=0.1, workers=2,
                                eos_token=None if kind == "byte-level" else "</s>")
    stats = prep.prepare(config)
    assert stats.encoder == ("tiktoken" if kind == "byte-level" else "tokenizers")
    reference = Tokenizer.from_file(str(tokenizer_path))
    reference.encode_special_tokens = True
    eos = reference.token_to_id("<|endoftext|>" if kind == "byte-level" else "</s>")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    in_eval = [prep.goes_to_eval(i, 0.1, 0) for i in range(len(texts))]
    expected = {side: [reference.encode(t, add_special_tokens=False).ids for t, e in zip(texts, in_eval) if e == side]
                for side in (False, True)}
    for side, name in ((False, "train.bin"), (True, "eval.bin")):
        info = json.loads((tmp_path / (name + ".json")).read_text())
        assert info["dtype"] == "uint16" and info["eos_id"] == eos
        ids = np.fromfile(tmp_path / name, dtype=np.uint16)
        assert info["tokens"] == len(ids) and info["documents"] == len(expected[side])
        assert [d[:-1] for d in _documents(ids, eos)] == expected[side]
    assert 0 < stats.eval_documents < stats.documents
    assert token_file_dtype(None, 10**6, tmp_path / "train.bin") == "uint16"     # the sidecar's, not the vocab's
    assert not list(tmp_path.glob("*.partial"))


def test_plain_text_file_is_one_document_and_glob_in_quotes_works(tmp_path):
    tokenizer_path = _byte_level(tmp_path / "tokenizer.json")
    (tmp_path / "in").mkdir()
    for i, text in enumerate(TEXTS[:3]):
        (tmp_path / "in" / f"{i}.txt").write_text(text)
    result = CliRunner().invoke(app, ["data", "prepare", "--tokenizer", str(tokenizer_path), "--input",
                                      str(tmp_path / "in" / "*.txt"), "--out", str(tmp_path / "t.bin")])
    assert result.exit_code == 0, result.output
    assert "3 documents" in result.output and "MB/s" in result.output
    reference = Tokenizer.from_file(str(tokenizer_path))
    reference.encode_special_tokens = True
    ids = np.fromfile(tmp_path / "t.bin", dtype=np.uint16)
    assert [d[:-1] for d in _documents(ids, 0)] == [reference.encode(t).ids for t in TEXTS[:3]]


def _refused(args: list[str], *needles: str) -> None:
    result = CliRunner().invoke(app, ["data", "prepare", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_bad_input_is_one_line_and_nothing_is_half_written(tmp_path):
    tokenizer = str(_byte_level(tmp_path / "tokenizer.json"))
    corpus = _corpus(tmp_path)
    out = tmp_path / "out.bin"
    base = ["--tokenizer", tokenizer, "--input", str(corpus), "--out", str(out)]
    _refused([*base, "--model", "tiny-llama"], "--tokenizer", "tokens, the model's 256")
    _refused([*base, "--eos-token", "<nope>"], "--eos-token", "'<nope>'")
    _refused(["--tokenizer", str(tmp_path / "missing.json"), "--input", str(corpus), "--out", str(out)],
             "--tokenizer", "no tokenizer file")
    _refused(["--tokenizer", tokenizer, "--input", str(tmp_path / "none.jsonl"), "--out", str(out)], "no such file")
    _refused([*base, "--eval-out", str(tmp_path / "e.bin"), "--eval-fraction", "1.5"], "--eval-fraction")
    _refused([*base, "--eval-out", str(tmp_path / "e.bin"), "--eval-fraction", "1e-9"], "--eval-fraction",
             "none of the 200 documents")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(corpus.read_text() + '{"content": "no text field"}\n')
    _refused(["--tokenizer", tokenizer, "--input", str(broken), "--out", str(out)], "broken.jsonl:201",
             "--text-key")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    out.write_bytes(b"precious")
    _refused(base, "--out", "exists", "--overwrite")
    assert out.read_bytes() == b"precious"


def test_fast_path_refuses_tokenizers_it_cannot_reproduce(tmp_path):
    spec = json.loads(_byte_level(tmp_path / "t.json").read_text())
    assert prep.byte_level_bpe(spec) is not None
    assert prep.byte_level_bpe({**spec, "normalizer": {"type": "NFC"}}) is None
    assert prep.byte_level_bpe({**spec, "pre_tokenizer": {"type": "Whitespace"}}) is None
    added = {"id": 600, "content": "<tool_call>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False}
    assert prep.byte_level_bpe({**spec, "added_tokens": [*spec["added_tokens"], added]}) is None
    assert prep.byte_level_bpe({**spec, "added_tokens": [*spec["added_tokens"], {**added, "special": True}]})
    with pytest.raises(InputError):
        prep.find_eos(Tokenizer.from_file(str(_word_level(tmp_path / "w.json"))), "<nope>")


# Unicode's White_Space property (PropList.txt): the characters a tokenizer regex's \\s matches.
WHITE_SPACE = [*"\t\n\x0b\x0c\r \x85\xa0\u1680", *map(chr, range(0x2000, 0x200B)), *"\u2028\u2029\u202f\u205f\u3000"]
PIECES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\xa0", "\u3000", "\u2028", "\x1c", "a", "Bc", "word", "é",
          "\u0301", "'s", "'LL", "1", "12345", ".", "!?", "🚀", "_", "<|endoftext|>", "\\", "x\n", "\t "]


def _split_bpe(path: Path, pattern: str) -> Path:
    """A byte-level BPE whose pre-tokenizer is a Split on ``pattern`` (Llama 3 / Qwen2 style)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS * 20 + ["".join(PIECES)] * 5, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(path))
    return path


def test_word_boundary_never_cuts_where_a_tokenizer_regex_sees_whitespace():
    assert all(prep.WORD_BOUNDARY.pattern.startswith(" ") and re.match(r"\s", c) for c in WHITE_SPACE)
    assert prep.WORD_BOUNDARY.split(" a b  c\n d\xa0 e") == ["", "a", "b", " c\n d\xa0 e"]


def _random_texts(count: int) -> list[str]:
    rng = random.Random(0)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 40))) for _ in range(count)]
    return texts + [" leading", "trailing ", "   ", "a  \n  b", "\n a", "x\xa0  y", "x\u3000  y", "x\x1c  y"]


@pytest.mark.parametrize("pattern", prep.WORD_SAFE_PATTERNS, ids=["gpt2", "llama3", "qwen2"])
def test_cutting_at_word_boundaries_keeps_every_pre_token(pattern):
    """The regex finds the same pieces in a text as in its words one by one, whatever the vocabulary merges."""
    compiled = regex.compile(pattern)
    for text in _random_texts(3000):
        words = prep.WORD_BOUNDARY.split(text)
        pieces = [piece for i, word in enumerate(words) for piece in compiled.findall(word if i == 0 else " " + word)]
        assert pieces == compiled.findall(text), text


@pytest.mark.parametrize("pattern", ["gpt2", "llama3", "qwen2"])
def test_word_by_word_encoding_equals_tokenizers_on_adversarial_text(tmp_path, pattern):
    if pattern == "gpt2":
        path = _byte_level(tmp_path / "t.json", vocab=700)
    else:
        path = _split_bpe(tmp_path / "t.json", prep.LLAMA3_PATTERN if pattern == "llama3" else prep.QWEN2_PATTERN)
    tokenizer, spec = prep.load_tokenizer(path)
    bpe = prep.byte_level_bpe(spec)
    assert bpe is not None and bpe.by_words
    texts = _random_texts(1500)
    reference = prep.reference_encoder(tokenizer)(texts).documents()
    for cache_words in (2, prep.WORD_CACHE_WORDS):   # a full cache changes nothing
        encoder = prep.TiktokenEncoder(bpe, cache_words=cache_words)
        for _ in range(2):                           # the second pass reads the cache
            got = encoder(texts).documents()
            bad = [t for t, a, b in zip(texts, got, reference) if not np.array_equal(a, b)]
            assert not bad, bad[:3]
        assert len(encoder.words) <= cache_words


def test_other_patterns_encode_whole_documents(tmp_path):
    pattern = prep.LLAMA3_PATTERN.replace(r"\s+(?!\S)|", r"\s+$|\s+(?!\S)|")
    tokenizer, spec = prep.load_tokenizer(_split_bpe(tmp_path / "t.json", pattern))
    bpe = prep.byte_level_bpe(spec)
    assert bpe is not None and not bpe.by_words
    texts = ["a b  c \n", "x\t y "]
    assert all(np.array_equal(a, b) for a, b in zip(prep.TiktokenEncoder(bpe)(texts).documents(),
                                                     prep.reference_encoder(tokenizer)(texts).documents()))


@pytest.mark.parametrize("workers", [1, 2])
def test_tiktoken_that_disagrees_with_tokenizers_is_dropped_with_a_note(tmp_path, monkeypatch, workers):
    tokenizer_path = _byte_level(tmp_path / "tokenizer.json")
    good = prep.byte_level_bpe(json.loads(tokenizer_path.read_text()))
    wrong_ids = good.rank_to_id[::-1].copy()                             # every token's id wrong
    monkeypatch.setattr(prep, "byte_level_bpe", lambda spec: prep.ByteLevelBPE(good.pattern, good.ranks, wrong_ids))
    monkeypatch.setattr(prep, "BATCH_BYTES", 2000)                        # many batches in flight
    notes: list[str] = []
    config = prep.PrepareConfig(tokenizer=tokenizer_path, inputs=(_corpus(tmp_path, 600),), out=tmp_path / "t.bin",
                                workers=workers)
    stats = prep.prepare(config, note=notes.append)
    assert stats.encoder == "tokenizers" and notes == [
        "tiktoken and tokenizers disagree on these documents; encoding with tokenizers"]
    reference = Tokenizer.from_file(str(tokenizer_path))
    reference.encode_special_tokens = True
    texts = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    ids = np.fromfile(tmp_path / "t.bin", dtype=np.uint16)
    assert [d[:-1] for d in _documents(ids, 0)] == [reference.encode(t).ids for t in texts]
