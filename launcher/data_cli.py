"""``meshplan data prepare``: tokenize text / JSON-lines files into the token files ``launch --data`` reads
(``launcher/prepare.py`` does the work). Registered by ``launcher/cli.py``; torch-free."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from meshplan.errors import InputError, MeshplanError


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(no_args_is_help=True, help="Training data: tokenize text into the token files "
                                                         "`launch --data` reads.")
    data_app.command("prepare", help="Tokenize text / JSON-lines files into flat token files (EOS between "
                                     "documents, uint16/uint32, an evaluation split).")(data_prepare)
    app.add_typer(data_app, name="data")


def data_prepare(
    extra_inputs: Optional[list[Path]] = typer.Argument(None, metavar="[INPUTS]...", help="more input files"),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer.json, or the model directory holding it"),
    inputs: Optional[list[str]] = typer.Option(None, "--input", "-i", help="text or JSON-lines files (a glob in "
                                               "quotes is expanded)"),
    out: Path = typer.Option(..., "--out", "-o", help="the training token file"),
    eval_out: Optional[Path] = typer.Option(None, "--eval-out", help="the evaluation token file"),
    eval_fraction: float = typer.Option(0.01, "--eval-fraction", help="share of documents for --eval-out"),
    text_key: str = typer.Option("text", "--text-key", help="the field of a JSON line holding the text"),
    eos_token: Optional[str] = typer.Option(None, "--eos-token", help="the end-of-sequence token (default: the "
                                            "tokenizer's <|endoftext|>, </s>, ...)"),
    model: Optional[str] = typer.Option(None, "--model", help="refuse a tokenizer whose vocabulary is larger "
                                        "than this model's (a preset, model YAML or config.json)"),
    seed: int = typer.Option(0, "--seed", help="seeds the evaluation split"),
    workers: int = typer.Option(os.cpu_count() or 1, "--workers", help="encoding processes (tiktoken)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing outputs"),
) -> None:
    try:
        _data_prepare(tokenizer, [*(inputs or []), *map(str, extra_inputs or [])], out, eval_out, eval_fraction,
                      text_key, eos_token, model, seed, workers, overwrite)
    except MeshplanError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code)


def _data_prepare(tokenizer, inputs, out, eval_out, eval_fraction, text_key, eos_token, model, seed, workers,
                  overwrite) -> None:
    import glob

    from meshplan.launcher.prepare import PrepareConfig, prepare
    from meshplan.spec import load_model

    paths: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise InputError("--input", f"{item} matches no file", "check the pattern")
        paths += [Path(m) for m in matches]
    if workers < 1:
        raise InputError("--workers", f"must be >= 1, got {workers}", "give a process count")
    config = PrepareConfig(tokenizer=tokenizer, inputs=tuple(paths), out=out, eval_out=eval_out,
                           eval_fraction=eval_fraction, text_key=text_key, eos_token=eos_token,
                           model_vocab=load_model(model).vocab if model else None, overwrite=overwrite, seed=seed,
                           workers=workers)
    total = sum(p.stat().st_size for p in paths if p.is_file())
    with typer.progressbar(length=total, label="tokenizing", file=sys.stderr) as bar:
        stats = prepare(config, progress=bar.update, note=lambda text: typer.echo(f"note: {text}", err=True))
    typer.echo(f"wrote {out}: {stats.documents:,} documents, {stats.tokens:,} tokens ({stats.dtype})", err=True)
    if eval_out is not None:
        typer.echo(f"wrote {eval_out}: {stats.eval_documents:,} documents, {stats.eval_tokens:,} tokens", err=True)
    typer.echo(f"{stats.input_bytes / 1e6:,.1f} MB in {stats.seconds:.1f} s ({stats.mb_per_s:.1f} MB/s, "
               f"{stats.encoder})", err=True)
