"""``meshplan data prepare``: documents tokenized exactly as ``tokenizers`` does, EOS between them, a stable
evaluation split, the dtype recorded beside the file, and every bad input refused in one line with nothing
half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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
                                eval_out=tmp_path / "eval.bin", eval_fraction=0.1, threads=2,
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
    assert prep.fast_encoder(spec, 1) is not None
    assert prep.fast_encoder({**spec, "normalizer": {"type": "NFC"}}, 1) is None
    assert prep.fast_encoder({**spec, "pre_tokenizer": {"type": "Whitespace"}}, 1) is None
    with pytest.raises(InputError):
        prep.find_eos(Tokenizer.from_file(str(_word_level(tmp_path / "w.json"))), "<nope>")
