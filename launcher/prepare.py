"""``meshplan data prepare``: text or JSON lines in, the flat token files ``meshplan launch --data`` reads out.

Documents:
    * ``.jsonl`` / ``.json``: one JSON object per line, its ``--text-key`` field (default ``text``) one document;
    * any other file: the whole file is one document (encoded in one piece, so its tokens are exactly those of
      the text; the work is spread over files, not within one).

Each document is tokenized with a Hugging Face ``tokenizers`` file (``tokenizer.json``, or a directory holding
one), as ordinary text (a special token's spelling inside a document is text, not the token), and followed by
the end-of-sequence token. A document goes to the evaluation file with probability ``--eval-fraction``, decided
by a hash of its index and ``--seed`` (the same split every time). Token ids are written as ``uint16`` when the
vocabulary (the tokenizer's, or the model's when larger) fits in 16 bits, else ``uint32``; a sidecar
``<file>.json`` records the dtype, the counts and the tokenizer, and ``launch`` reads the dtype from it.

Speed: a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2 style: no normalizer, ByteLevel or Split +
ByteLevel pre-tokenization) is run by ``tiktoken`` in ``workers`` processes, with the merge order of the
``tokenizers`` file, and for the GPT-2, Llama 3 and Qwen2 regexes word by word through a cache
(:class:`TiktokenEncoder` says why that is exact). The first batch's documents (at most
:data:`VERIFY_DOCUMENTS`) are encoded both ways and must agree token for token, else (or for any other
tokenizer) ``tokenizers`` encodes everything. Outputs are written to ``<file>.partial`` and renamed when
complete: an interrupted run leaves no half-written file under the final name.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
import zlib
from array import array
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from meshplan.errors import InputError

EOS_SPELLINGS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>", "<|eos|>")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's and Qwen2's Split regex, as their tokenizer.json files spell it
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
WORD_SAFE_PATTERNS = (GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN)   # see TiktokenEncoder
WORD_BOUNDARY = re.compile(r" (?<!\s )")     # a space after a non-space character (or at the start)
WORD_CACHE_WORDS = 1 << 19     # words an encoding process remembers (~100 MB)
BATCH_BYTES = 1 << 20          # documents per encode call, by size
VERIFY_DOCUMENTS = 256         # of the first batch's documents, encoded both ways before tiktoken is trusted



class Encoded(NamedTuple):
    """A batch of documents encoded: every document's ids end to end, and each document's count."""

    ids: np.ndarray           # int32
    lengths: np.ndarray       # int64, one per document

    @classmethod
    def of(cls, documents: list[bytes]) -> "Encoded":
        """From each document's ids as int32 bytes."""
        return cls(np.frombuffer(b"".join(documents), dtype=np.int32), np.array([len(d) // 4 for d in documents]))

    def documents(self) -> list[np.ndarray]:
        return np.split(self.ids, np.cumsum(self.lengths)[:-1])


Encoder = Callable[[list[str]], Encoded]


@dataclass(frozen=True)
class PrepareConfig:
    """What ``meshplan data prepare`` does.

    Fields:
        tokenizer: ``tokenizer.json`` or a directory holding it.
        inputs: text / JSON-lines files, in order.
        out, eval_out: the training and (optional) evaluation token files.
        eval_fraction: the probability that a document goes to ``eval_out``.
        text_key: the field of a JSON line that holds the document.
        eos_token: the end-of-sequence token's spelling (default: the first of :data:`EOS_SPELLINGS` the
            tokenizer has).
        model_vocab: the model's vocabulary; a larger tokenizer vocabulary is refused.
        overwrite: replace existing outputs.
        seed: seeds the evaluation split.
        workers: processes encoding with tiktoken (``tokenizers`` runs on its own threads).
    """

    tokenizer: Path
    inputs: tuple[Path, ...]
    out: Path
    eval_out: Path | None = None
    eval_fraction: float = 0.01
    text_key: str = "text"
    eos_token: str | None = None
    model_vocab: int | None = None
    overwrite: bool = False
    seed: int = 0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)


@dataclass
class PrepareStats:
    """What a run wrote: documents and tokens per file, the input bytes, the time, the encoder used."""

    documents: int = 0
    eval_documents: int = 0
    tokens: int = 0
    eval_tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    dtype: str = "uint16"
    encoder: str = "tokenizers"

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------

def load_tokenizer(path: Path):
    """The ``tokenizers.Tokenizer`` and its JSON (for the fast path)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("--tokenizer", "needs the tokenizers package", "pip install 'meshplan[data]'") from None
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError("--tokenizer", f"no tokenizer file at {file}",
                         "give a tokenizer.json or the Hugging Face model directory holding it")
    try:
        tokenizer = Tokenizer.from_file(str(file))
        spec = json.loads(file.read_text())
    except Exception as exc:  # tokenizers raises a plain Exception on a malformed file
        raise InputError("--tokenizer", f"{file} is not a tokenizers file: {str(exc).splitlines()[0][:160]}",
                         "give the tokenizer.json of a Hugging Face model") from None
    tokenizer.encode_special_tokens = True       # a special token's spelling inside a document is text
    return tokenizer, spec


def find_eos(tokenizer, spelling: str | None) -> int:
    """The id of the end-of-sequence token: ``spelling``'s, or the first of :data:`EOS_SPELLINGS` known."""
    for candidate in ([spelling] if spelling else EOS_SPELLINGS):
        token = tokenizer.token_to_id(candidate)
        if token is not None:
            return token
    if spelling:
        raise InputError("--eos-token", f"the tokenizer has no token {spelling!r}", "give a token it has")
    raise InputError("--eos-token", f"the tokenizer has none of {', '.join(EOS_SPELLINGS)}",
                     "name its end-of-sequence token with --eos-token")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as in the vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _pre_token_pattern(spec: dict) -> str | None:
    """The regex of a byte-level pre-tokenizer (GPT-2's, or a Split's before a regex-free ByteLevel)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space") \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and "Regex" in (steps[0].get("pattern") or {}):
        return steps[0]["pattern"]["Regex"]
    return None


@dataclass(frozen=True)
class ByteLevelBPE:
    """A ``tokenizers`` byte-level BPE in tiktoken's terms: what an encoding process rebuilds it from.

    Fields:
        pattern: the pre-tokenizer's regex.
        ranks: byte string -> merge rank (the 256 bytes first, then merge ``i`` as rank ``256 + i``).
        rank_to_id: rank -> the tokenizer file's token id.
    """

    pattern: str
    ranks: dict[bytes, int]
    rank_to_id: np.ndarray

    @property
    def by_words(self) -> bool:
        """Whether documents may be encoded word by word (see :class:`TiktokenEncoder`)."""
        return self.pattern in WORD_SAFE_PATTERNS


def byte_level_bpe(spec: dict) -> ByteLevelBPE | None:
    """The tokenizer as tiktoken runs it (merge ``i`` is rank ``256 + i``, as the ``tokenizers`` model applies
    merges in list order), or ``None`` when it is not a plain byte-level BPE or tiktoken is not installed."""
    model = spec.get("model") or {}
    pattern = _pre_token_pattern(spec)
    if model.get("type") != "BPE" or pattern is None or spec.get("normalizer") or model.get("dropout") \
            or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    if any(not token.get("special", True) for token in spec.get("added_tokens") or []):
        return None       # tokenizers finds a non-special added token inside text; tiktoken would not
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None
    decode = _byte_decoder()
    vocab = model["vocab"]

    def to_bytes(token: str) -> bytes | None:
        return bytes(decode[c] for c in token) if all(c in decode for c in token) else None

    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for i, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = to_bytes(left + right)
        if merged is None or merged in ranks:
            return None
        ranks[merged] = 256 + i
    spell = {b: c for c, b in decode.items()}
    rank_to_id = np.full(len(ranks), -1, dtype=np.int32)
    for token, rank in ranks.items():
        spelled = "".join(spell[b] for b in token)
        if spelled not in vocab:
            return None
        rank_to_id[rank] = vocab[spelled]
    if model.get("ignore_merges") and len(vocab) > len(ranks):
        return None       # whole-word tokens no merge makes: tiktoken would not find them
    return ByteLevelBPE(pattern, ranks, rank_to_id)


class TiktokenEncoder:
    """Documents -> token ids with tiktoken, as the ``tokenizers`` file encodes them.

    For a pattern of :data:`WORD_SAFE_PATTERNS` a document is cut before every space that follows a
    non-space character (:data:`WORD_BOUNDARY`), and each piece ("word") is encoded on its own, through a cache
    of up to ``cache_words`` words. The cut is exact for these patterns: in each of them a space stands inside
    a match only as its first character or in a match of whitespace alone, so no match spans a space that
    follows a non-space character; the only lookahead, ``(?!\\S)``, ends whitespace alone. Python's ``\\s``
    matches every Unicode White_Space character (and four more), so the cut is never made where the pattern
    would see whitespace before the space. Any other pattern encodes whole documents.
    """

    def __init__(self, bpe: ByteLevelBPE, cache_words: int = WORD_CACHE_WORDS):
        import tiktoken

        self.encoding = tiktoken.Encoding("meshplan-prepare", pat_str=bpe.pattern, mergeable_ranks=bpe.ranks,
                                          special_tokens={})
        self.id_of = bpe.rank_to_id.tolist()     # rank -> token id
        self.by_words = bpe.by_words
        self.cache_words = cache_words
        self.words: dict[str, bytes] = {}        # word w -> the int32 ids of " " + w

    def _ids(self, text: str) -> bytes:
        """``text``'s token ids as int32 bytes."""
        return array("i", map(self.id_of.__getitem__, self.encoding.encode_ordinary(text))).tobytes()

    def encode_document(self, text: str) -> bytes:
        if not self.by_words:
            return self._ids(text)
        words = WORD_BOUNDARY.split(text)
        found = list(map(self.words.get, words))
        found[0] = self._ids(words[0])          # the first word has no space before it
        i = 1
        while True:
            try:
                i = found.index(None, i)
            except ValueError:
                break
            found[i] = self._ids(" " + words[i])
            if len(self.words) < self.cache_words:
                self.words[words[i]] = found[i]
            i += 1
        return b"".join(found)

    def __call__(self, texts: list[str]) -> Encoded:
        return Encoded.of([self.encode_document(text) for text in texts])


_process_encoder: TiktokenEncoder | None = None


def _start_process(bpe: ByteLevelBPE) -> None:
    global _process_encoder
    _process_encoder = TiktokenEncoder(bpe)


def _encode_in_process(texts: list[str]) -> Encoded:
    assert _process_encoder is not None
    return _process_encoder(texts)


@contextmanager
def _tiktoken_submitter(bpe: ByteLevelBPE, workers: int) -> Iterator[Callable[[list[str]], Future]]:
    """``submit(texts) -> Future`` of the encoded documents: in this process for one worker, else in a pool of
    ``workers`` processes, each with its own word cache. On Linux the processes are forked (no second import,
    the tables inherited; the caller has not used ``tokenizers``' threads yet), elsewhere spawned (a script
    that calls :func:`prepare` then needs the ``if __name__ == "__main__":`` guard)."""
    if workers == 1:
        encoder = TiktokenEncoder(bpe)

        def submit(texts: list[str]) -> Future:
            future: Future = Future()
            future.set_result(encoder(texts))
            return future

        yield submit
        return
    start_method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method),
                               initializer=_start_process, initargs=(bpe,))
    try:
        yield lambda texts: pool.submit(_encode_in_process, texts)
    finally:
        pool.shutdown(cancel_futures=True)


def reference_encoder(tokenizer, parallel: bool = True) -> Encoder:
    """``tokenizers`` itself: on its own threads, or (``parallel=False``) on this thread alone, which leaves
    the cores to tiktoken's processes (its idle threads spin for a while)."""
    def encode(texts: list[str]) -> Encoded:
        if parallel:
            encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        else:
            encodings = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        return Encoded.of([array("i", e.ids).tobytes() for e in encodings])
    return encode


# ----------------------------------------------------------------------------------------------
# documents
# ----------------------------------------------------------------------------------------------

def read_documents(paths: tuple[Path, ...], text_key: str) -> Iterator[tuple[str, int]]:
    """``(document, input bytes it took)`` in order."""
    for path in paths:
        if path.suffix not in (".jsonl", ".json"):
            data = path.read_bytes()
            yield data.decode("utf-8", errors="replace"), len(data)
            continue
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    yield "", len(line)
                    continue
                try:
                    text = json.loads(line)[text_key]
                except (ValueError, KeyError, TypeError):
                    raise InputError("--input", f"{path}:{number} is not a JSON object with a {text_key!r} field",
                                     "fix the line, or name the text field with --text-key") from None
                if not isinstance(text, str):
                    raise InputError("--input", f"{path}:{number}: {text_key!r} is not a string",
                                     "name the text field with --text-key")
                yield text, len(line)


def goes_to_eval(index: int, fraction: float, seed: int) -> bool:
    """Document ``index``'s side of the split: a hash of ``(seed, index)`` below ``fraction``."""
    return zlib.crc32(f"{seed}:{index}".encode()) < fraction * 2**32


def _batches(documents: Iterator[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    texts, size, consumed = [], 0, 0
    for text, nbytes in documents:
        consumed += nbytes
        if text:
            texts.append(text)
            size += len(text)
        if size >= BATCH_BYTES:
            yield texts, consumed
            texts, size, consumed = [], 0, 0
    if texts or consumed:
        yield texts, consumed


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------

def check_config(config: PrepareConfig) -> None:
    """Everything that can be refused before any reading: one line each."""
    for path in config.inputs:
        if not path.is_file():
            raise InputError("--input", f"no such file: {path}", "give text or JSON-lines files")
    if not config.inputs:
        raise InputError("--input", "no input files", "give text or JSON-lines files")
    if not 0 < config.eval_fraction < 1:
        raise InputError("--eval-fraction", f"must be between 0 and 1, got {config.eval_fraction:g}",
                         "give the share of documents to hold out, e.g. 0.01")
    outputs = [p for p in (config.out, config.eval_out) if p is not None]
    if len(set(outputs)) < len(outputs) or any(p in config.inputs for p in outputs):
        raise InputError("--out", "the outputs must differ from each other and from the inputs", "name new files")
    for path in outputs:
        if path.exists() and not config.overwrite:
            raise InputError("--out" if path == config.out else "--eval-out", f"{path} exists",
                             "pass --overwrite to replace it, or name a new file")


def prepare(config: PrepareConfig, progress: Callable[[int], None] | None = None,
            note: Callable[[str], None] | None = None) -> PrepareStats:
    """Tokenize ``config.inputs`` into ``config.out`` (and ``config.eval_out``); ``progress(n)`` is called
    with the input bytes each batch consumed, ``note(text)`` with what the user should know."""
    check_config(config)
    tokenizer, spec = load_tokenizer(config.tokenizer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if config.model_vocab is not None and vocab > config.model_vocab:
        raise InputError("--tokenizer", f"its vocabulary has {vocab} tokens, the model's {config.model_vocab}",
                         "use the model's own tokenizer")
    eos = find_eos(tokenizer, config.eos_token)
    dtype = "uint16" if max(vocab, config.model_vocab or 0) <= 65536 else "uint32"
    bpe = byte_level_bpe(spec)
    stats = PrepareStats(dtype=dtype)
    outputs = {"train": config.out, "eval": config.eval_out}
    partial = {k: p.with_name(p.name + ".partial") for k, p in outputs.items() if p is not None}
    files = {k: open(p, "wb") for k, p in partial.items()}
    start = time.perf_counter()
    try:
        batches = _batches(read_documents(config.inputs, config.text_key))
        for encoded, consumed, encoder in _encoded(batches, bpe, tokenizer, config.workers, note):
            stats.encoder = encoder
            _write(encoded, eos, dtype, files, config, stats)
            stats.input_bytes += consumed
            if progress:
                progress(consumed)
        for f in files.values():
            f.close()
        _check_outputs(config, stats)
        for key, path in partial.items():
            os.replace(path, outputs[key])
            _write_sidecar(outputs[key], stats, key, config, eos)
    finally:
        for f in files.values():
            f.close()
        for path in partial.values():
            path.unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - start
    return stats


def _write(encoded: Encoded, eos: int, dtype: str, files: dict, config: PrepareConfig, stats: PrepareStats) -> None:
    """Append a batch's documents, each followed by ``eos``, to the training or evaluation file."""
    first = stats.documents + stats.eval_documents
    to_eval = np.array([config.eval_out is not None and goes_to_eval(first + i, config.eval_fraction, config.seed)
                        for i in range(len(encoded.lengths))], dtype=bool)
    ids = np.insert(encoded.ids, np.cumsum(encoded.lengths), eos).astype(dtype)
    token_to_eval = np.repeat(to_eval, encoded.lengths + 1)
    for side, chosen in (("train", ~token_to_eval), ("eval", token_to_eval)):
        if chosen.any():
            files[side].write(ids[chosen].tobytes())
    eval_documents, eval_tokens = int(to_eval.sum()), int(token_to_eval.sum())
    stats.eval_documents += eval_documents
    stats.eval_tokens += eval_tokens
    stats.documents += len(to_eval) - eval_documents
    stats.tokens += len(ids) - eval_tokens


def _encoded(batches: Iterator[tuple[list[str], int]], bpe: ByteLevelBPE | None, tokenizer, workers: int,
             note: Callable[[str], None] | None) -> Iterator[tuple[Encoded, int, str]]:
    """``(ids per document, input bytes, encoder)`` for each batch, in order: tiktoken (``workers`` processes,
    up to two batches each in flight) when the first batch's documents (at most :data:`VERIFY_DOCUMENTS`) agree
    with ``tokenizers`` (checked while the next batches encode); ``tokenizers`` for everything when they do not, or
    when there is no ``bpe``."""
    reference = reference_encoder(tokenizer)
    if bpe is None:
        yield from ((reference(texts), consumed, "tokenizers") for texts, consumed in batches)
        return
    check = reference_encoder(tokenizer, parallel=False)
    trusted: bool | None = None        # whether tiktoken agrees with tokenizers; None until checked

    def finish(future: Future | None, texts: list[str], consumed: int) -> tuple[Encoded, int, str]:
        nonlocal trusted
        if trusted is None:
            assert future is not None
            sample = check(texts[:VERIFY_DOCUMENTS]).documents()
            trusted = all(np.array_equal(a, b) for a, b in zip(future.result().documents(), sample))
            if not trusted and note:
                note("tiktoken and tokenizers disagree on these documents; encoding with tokenizers")
        if not trusted:
            return reference(texts), consumed, "tokenizers"
        assert future is not None
        return future.result(), consumed, "tiktoken"

    with _tiktoken_submitter(bpe, workers) as submit:
        window: deque[tuple[Future | None, list[str], int]] = deque()
        for texts, consumed in batches:
            window.append((submit(texts) if trusted is not False else None, texts, consumed))
            while len(window) > 2 * workers:
                yield finish(*window.popleft())
        while window:
            yield finish(*window.popleft())


def _check_outputs(config: PrepareConfig, stats: PrepareStats) -> None:
    if stats.documents == 0:
        raise InputError("--input", "no document reached the training file", "give non-empty inputs")
    if config.eval_out is not None and stats.eval_documents == 0:
        raise InputError("--eval-fraction", f"none of the {stats.documents} documents went to the evaluation file",
                         "raise --eval-fraction, or give more documents")


def _write_sidecar(path: Path, stats: PrepareStats, key: str, config: PrepareConfig, eos: int) -> None:
    """``<file>.json``: what the file holds (``launch`` reads ``dtype`` from it)."""
    info = {"dtype": stats.dtype, "tokens": stats.eval_tokens if key == "eval" else stats.tokens,
            "documents": stats.eval_documents if key == "eval" else stats.documents, "eos_id": eos,
            "tokenizer": str(config.tokenizer), "inputs": [str(p) for p in config.inputs]}
    sidecar(path).write_text(json.dumps(info, indent=2) + "\n")


def sidecar(path: Path) -> Path:
    """Where the description of token file ``path`` is written."""
    return path.with_name(path.name + ".json")
