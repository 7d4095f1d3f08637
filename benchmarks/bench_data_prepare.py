"""The speed of ``meshplan data prepare`` on 100 MB of text.

    python benchmarks/bench_data_prepare.py [--mb 100] [--json benchmarks/results/data_prepare.json]

The corpus is built here, the same on every machine: JSON lines of English prose and code examples, the
docstrings of this Python's standard library (paragraphs sampled with a fixed seed into documents of eight).
The tokenizer is a byte-level BPE like GPT-2's (32,000 tokens, ``<|endoftext|>``), trained by ``tokenizers``
on those paragraphs. The table gives the input size, the time and MB/s of the whole command (reading,
encoding, splitting, writing) with one encoding process per CPU (the default): on the whole corpus with the
encoder ``prepare`` picks (tiktoken word by word, verified against ``tokenizers``), and on a corpus a tenth
as large both with that encoder and with ``tokenizers`` alone; it checks that the two wrote the same tokens
there.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import wrap  # noqa: E402

from meshplan.launcher import prepare as prep  # noqa: E402


def paragraphs() -> list[str]:
    """The standard library's docstrings of more than 200 characters, in file order."""
    root = Path(ast.__file__).parent
    found = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    found.append(doc)
    return found


def write_corpus(path: Path, source: list[str], megabytes: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    size = 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            line = json.dumps({"text": "\n\n".join(rng.sample(source, 8))}) + "\n"
            f.write(line)
            size += len(line.encode())
    return size


def train_tokenizer(path: Path, source: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(source, trainer)
    tokenizer.save(str(path))


def run(tokenizer: Path, corpus: Path, out: Path, fast: bool) -> prep.PrepareStats:
    config = prep.PrepareConfig(tokenizer=tokenizer, inputs=(corpus,), out=out, overwrite=True)
    if fast:
        return prep.prepare(config)
    original = prep.byte_level_bpe
    prep.byte_level_bpe = lambda spec: None
    try:
        return prep.prepare(config)
    finally:
        prep.byte_level_bpe = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    source = paragraphs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(tmp / "tokenizer.json", source)
        write_corpus(tmp / "corpus.jsonl", source, args.mb)
        write_corpus(tmp / "tenth.jsonl", source, args.mb / 10)
        chosen = run(tmp / "tokenizer.json", tmp / "corpus.jsonl", tmp / "corpus.bin", fast=True)
        fast_tenth = run(tmp / "tokenizer.json", tmp / "tenth.jsonl", tmp / "fast.bin", fast=True)
        reference = run(tmp / "tokenizer.json", tmp / "tenth.jsonl", tmp / "reference.bin", fast=False)
        same = np.array_equal(np.fromfile(tmp / "fast.bin", np.uint16), np.fromfile(tmp / "reference.bin", np.uint16))
    rows = [[f"{s.input_bytes / 1e6:.1f}", s.encoder, f"{s.tokens:,}", f"{s.seconds:.1f}", f"{s.mb_per_s:.1f}"]
            for s in (chosen, fast_tenth, reference)]
    headers = ["input MB", "encoder", "tokens", "seconds", "MB/s"]
    print(tabulate(rows, headers=headers))
    print(f"tiktoken and tokenizers wrote the same tokens on the {args.mb / 10:g} MB corpus: {same}")
    if args.json:
        command = "python benchmarks/bench_data_prepare.py" + (f" --mb {args.mb:g}" if args.mb != 100 else "")
        record = wrap(command, None, title="`meshplan data prepare` on JSON lines (stdlib docstrings), byte-level "
                      "BPE 32k", tables=[{"caption": "input, encoder, tokens written, wall time and throughput",
                                         "headers": headers, "rows": rows}],
                      notes=[f"tiktoken and tokenizers wrote the same tokens on the {args.mb / 10:g} MB corpus: "
                             f"{same}"])
        record.pop("result")
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
