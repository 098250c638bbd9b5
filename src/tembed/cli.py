"""The ``tembed`` command line.

* ``tembed encode INPUT -o OUTPUT``: embed a corpus file (or stdin) to parquet / npy, streaming, resumable;
* ``tembed models``: the registry; ``tembed info MODEL``: how a model resolves;
* ``tembed embed TEXT...``: a few texts to JSON arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer

from tembed.models import ModelNotFoundError
from tembed.models.registry import DEFAULT_MODEL, list_models

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Text embeddings: dense, sparse and ColBERT.")


@app.command("models")
def models_command() -> None:
    """List the registry: model families, pooling, instructions, max lengths."""
    rows = [("name", "family", "pooling", "query instruction", "max len")]
    for spec in list_models():
        instruction = (spec.query_instruction or "").replace("\n", "\\n")
        rows.append(
            (spec.hub_id or spec.name, spec.family, spec.pooling, instruction[:40], str(spec.passage_max_length))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@app.command("info")
def info_command(model: str = typer.Argument(DEFAULT_MODEL, help="Folder, registry name or hub id.")) -> None:
    """Show how a model resolves: files, family, pooling, instructions, dimension and max length."""
    from tembed import Embedder

    with Embedder(model, device="cpu") as embedder:
        spec = embedder.spec
        info = {
            "model": model,
            "path": embedder.resolved.path,
            "source": embedder.resolved.source,
            "registry_entry": spec.name if embedder.resolved.in_registry else None,
            "family": spec.family,
            "kind": spec.kind,
            "pooling": embedder.pooling,
            "normalize": embedder.normalize,
            "query_instruction": embedder.query_instruction,
            "query_instruction_format": embedder.query_instruction_format,
            "passage_instruction": embedder.passage_instruction,
            "embedding_dim": embedder.embedding_dim,
            "max_seq_length": embedder.max_seq_length,
            "query_max_length": embedder.query_max_length,
            "passage_max_length": embedder.passage_max_length,
            "outputs": list(spec.outputs),
            "backend": embedder.backend_name,
            "precision": embedder.precision,
        }
    typer.echo(json.dumps(info, indent=2, ensure_ascii=False))


@app.command("embed")
def embed_command(
    texts: list[str] = typer.Argument(..., help="Texts to embed."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Folder, registry name or hub id."),
    kind: str = typer.Option("plain", "--kind", help="query, passage or plain."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: auto)."),
) -> None:
    """Embed a few texts and print one JSON array per line."""
    from tembed import Embedder

    with Embedder(model, device=device) as embedder:
        method = {"query": embedder.encode_queries, "passage": embedder.encode_corpus, "plain": embedder.encode}
        if kind not in method:
            raise typer.BadParameter(f"--kind must be query, passage or plain, got {kind!r}")
        for vector in method[kind](texts):
            sys.stdout.write(json.dumps([round(float(x), 7) for x in vector]) + "\n")


# ------------------------------------------------------------------------------------------------------ encode
KINDS = ("passage", "query", "plain")
DEFAULT_CHUNK_SIZE = 2048


class _Stop(Exception):
    """Ends ``tembed encode`` with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _open_embedder(model: str, **kwargs: Any) -> Any:
    """Load the model once for the run (tests replace this to share one model between runs)."""
    from tembed import Embedder

    return Embedder(model, **kwargs)


def _close_embedder(embedder: Any) -> None:
    embedder.close()


def _size(num_bytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000  # type: ignore[assignment]
    return ""


def _chunks(reader: Any, size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in reader:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@app.command("encode")
def encode_command(
    input_path: str = typer.Argument(
        ..., metavar="INPUT", help="A .jsonl, .csv, .tsv, .parquet or .txt file; - for stdin."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Where to write: a .parquet or .npy file."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Folder, registry name or hub id."),
    kind: str = typer.Option(
        "passage", "--kind", help="passage (corpus instruction and length), query, or plain (no instruction)."
    ),
    text_field: str = typer.Option("text", "--text-field", help="Field / column holding the text."),
    id_field: str = typer.Option("id", "--id-field", help="Field / column holding the id; else line numbers."),
    title_field: str = typer.Option(
        "title", "--title-field", help='Field joined before the text as f"{title} {text}"; "" for none.'
    ),
    input_format: str = typer.Option(
        None, "--format", help="Input format (jsonl, csv, tsv, parquet, txt); default: from the suffix, stdin: jsonl."
    ),
    dense: bool = typer.Option(False, "--dense", help="Write dense vectors (the default when no output is named)."),
    sparse: bool = typer.Option(False, "--sparse", help="Write sparse lexical weights (BGE-M3, SPLADE)."),
    colbert: bool = typer.Option(False, "--colbert", help="Write ColBERT token vectors (BGE-M3)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: the first GPU, else cpu)."),
    backend: str = typer.Option(
        "auto", "--backend", help="auto (OpenVINO on CPU for encoders, else torch), torch, onnx or openvino."
    ),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, fp16, bf16 or int8 (CPU)."),
    batch_size: int = typer.Option(
        None, "--batch-size", min=1, help="Most texts per forward pass (default: 64 on the CPU, 256 on GPUs)."
    ),
    max_length: int = typer.Option(None, "--max-length", min=1, help="Most tokens per text (default: the model's)."),
    chunk_size: int = typer.Option(
        DEFAULT_CHUNK_SIZE, "--chunk-size", min=1, help="Records per row group and per resume checkpoint."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run on the same input and options."),
    restart: bool = typer.Option(False, "--restart", help="Discard an interrupted run's partial results first."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip bad records, listing them in OUTPUT's .rejects.jsonl, instead of stopping."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
) -> None:
    """Embed a corpus file to parquet or npy: streamed, checkpointed per chunk, resumable with --resume."""
    arguments = dict(locals())
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # SIGTERM stops as cleanly as Ctrl-C
    except ValueError:  # not the main thread
        previous = None
    try:
        _encode(**arguments)
    except _Stop as stop:
        typer.echo(f"error: {stop}", err=True)
        raise typer.Exit(stop.code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _encode(
    *,
    input_path: str,
    output: str,
    model: str,
    kind: str,
    text_field: str,
    id_field: str,
    title_field: str,
    input_format: str | None,
    dense: bool,
    sparse: bool,
    colbert: bool,
    device: str | None,
    backend: str,
    precision: str,
    batch_size: int | None,
    max_length: int | None,
    chunk_size: int,
    resume: bool,
    restart: bool,
    skip_invalid: bool,
    quiet: bool,
) -> None:
    from tembed.io import InputError, Manifest, PartialRun, Reader, ResumeError, fingerprint, output_format
    from tembed.io.readers import STDIN, count_items, detect_format

    if kind not in KINDS:
        raise _Stop(f"--kind must be passage, query or plain, got {kind!r}", 2)
    if resume and restart:
        raise _Stop("--resume and --restart contradict each other: pick one", 2)
    try:
        out_format = output_format(output)
        in_format = detect_format(input_path, input_format)
    except (ValueError, InputError) as error:
        raise _Stop(str(error), 2) from None
    outputs = tuple(name for name, wanted in (("dense", dense), ("sparse", sparse), ("colbert", colbert)) if wanted)
    outputs = outputs or ("dense",)
    if out_format == "npy" and outputs != ("dense",):
        raise _Stop(f"{output}: .npy holds dense vectors only; write .parquet for {', '.join(outputs)}", 2)
    if input_path == STDIN and resume:
        raise _Stop("--resume needs an input file: a run reading stdin cannot be checked and continued", 2)
    if input_path != STDIN and not os.path.isfile(input_path):
        raise _Stop(f"{input_path}: no such file", 2)
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise _Stop(f"{output}: the folder {directory} does not exist", 2)

    partial = PartialRun(output)
    source = fingerprint(input_path) if input_path != STDIN else {"path": STDIN}
    options = {
        "model": model,
        "kind": kind,
        "text_field": text_field,
        "id_field": id_field,
        "title_field": title_field,
        "input_format": in_format,
        "output_format": out_format,
        "outputs": list(outputs),
        "max_length": max_length,
        "precision": precision,
    }
    manifest = None
    try:
        if resume:
            manifest = partial.resume(source, options)
        elif partial.exists() and not restart:
            raise _Stop(
                f"an interrupted run left {partial.directory}: pass --resume to continue it, "
                f"or --restart to discard it and start over",
                2,
            )
    except ResumeError as error:
        raise _Stop(str(error), 2) from None

    load_started = time.perf_counter()
    try:
        embedder = _open_embedder(
            model,
            device=device,
            precision=precision,
            batch_size=batch_size,
            outputs=outputs,
            show_progress_bar=False,
            backend=backend,
        )
    except (ValueError, OSError, ModelNotFoundError) as error:
        raise _Stop(f"cannot load {model}: {error}", 2) from None
    load_seconds = time.perf_counter() - load_started
    try:
        _run(
            embedder=embedder,
            partial=partial,
            manifest=manifest or Manifest(input=source, options=options),
            fresh=manifest is None,
            reader_factory=lambda cursor: Reader(
                input_path,
                in_format,
                text_field=text_field,
                id_field=id_field or None,
                title_field=title_field or None,
                cursor=cursor,
            ),
            total=count_items(input_path, in_format) if (not quiet and sys.stderr.isatty()) else None,
            kind=kind,
            outputs=outputs,
            max_length=max_length,
            chunk_size=chunk_size,
            skip_invalid=skip_invalid,
            out_format=out_format,
            output=output,
            quiet=quiet,
            load_seconds=load_seconds,
        )
    except InputError as error:
        raise _Stop(str(error)) from None
    finally:
        _close_embedder(embedder)


def _run(
    *,
    embedder: Any,
    partial: Any,
    manifest: Any,
    fresh: bool,
    reader_factory: Any,
    total: int | None,
    kind: str,
    outputs: tuple[str, ...],
    max_length: int | None,
    chunk_size: int,
    skip_invalid: bool,
    out_format: str,
    output: str,
    quiet: bool,
    load_seconds: float,
) -> None:
    from tqdm.auto import tqdm

    from tembed.io import InputError
    from tembed.io.writers import (
        chunk_table,
        ids_path,
        merge_npy,
        merge_parquet,
        rejects_path,
        schema,
        write_durably,
        write_part,
    )
    from tembed.text import apply_instruction

    encode = {"query": embedder.encode_queries, "passage": embedder.encode_corpus, "plain": embedder.encode}[kind]
    instruction, instruction_format, default_length = {
        "query": (embedder.query_instruction, embedder.query_instruction_format, embedder.query_max_length),
        "passage": (embedder.passage_instruction, embedder.passage_instruction_format, embedder.passage_max_length),
        "plain": (None, None, embedder.passage_max_length),
    }[kind]
    token_limit = embedder.clamp_max_length(max_length or default_length, warn=max_length is not None)
    probe = embedder.encode(["probe"], outputs=outputs)
    colbert_dim = probe.colbert[0].shape[1] if "colbert" in outputs else None
    table_schema = schema(
        outputs,
        embedder.embedding_dim,
        colbert_dim,
        metadata={"model": manifest.options["model"], "kind": kind, "dim": embedder.embedding_dim, **manifest.options},
    )
    if fresh:
        partial.start(manifest)
    elif not quiet:
        typer.echo(
            f"resuming {partial.directory}: {manifest.rows:,} records done"
            + (f", {manifest.rejected:,} rejected" if manifest.rejected else "")
            + (f", continuing at line {manifest.cursor['line'] + 1:,}" if manifest.cursor.get("line") else ""),
            err=True,
        )

    rows_before, tokens_before, seconds_before = manifest.rows, manifest.tokens, manifest.seconds
    show = not quiet and sys.stderr.isatty()
    terminal = shutil.get_terminal_size((100, 20))  # a terminal that reports no size (0 x 0) hides tqdm's bar
    bar = tqdm(
        total=total,
        initial=manifest.rows + manifest.rejected,
        unit="text",
        desc="encode",
        file=sys.stderr,
        disable=not show,
        ncols=terminal.columns,
        nrows=terminal.lines,
        smoothing=0.1,
    )
    loop_started = time.perf_counter()
    reader = reader_factory(manifest.cursor)
    try:
        if not manifest.input_done:
            for chunk in _chunks(reader, chunk_size):
                records = [item for item in chunk if not hasattr(item, "reason")]
                rejects = [item for item in chunk if hasattr(item, "reason")]
                if out_format == "npy":
                    records, line_breaks = _split_line_break_ids(records)
                    rejects = sorted(rejects + line_breaks, key=lambda item: item.line_number)
                if rejects and not skip_invalid:
                    _stop_on_bad_record(reader.name, rejects[0], partial, manifest, output, rejects_path)
                index = len(manifest.parts) + len(manifest.reject_files)
                if records:
                    texts = [record.text for record in records]
                    result = encode(texts, max_length=token_limit, outputs=outputs)
                    name = f"part-{index:06d}.parquet"
                    write_part(partial.path(name), chunk_table([r.id for r in records], result, table_schema))
                    manifest.parts.append(name)
                    prepared = apply_instruction(texts, instruction, instruction_format)
                    manifest.tokens += sum(len(ids) for ids in embedder.tokenizer.encode(prepared, token_limit))
                if rejects:
                    name = f"rejects-{index:06d}.jsonl"
                    lines = [
                        json.dumps({"input": reader.name, "line": item.line_number, "reason": item.reason}) + "\n"
                        for item in rejects
                    ]
                    write_durably(partial.path(name), "".join(lines).encode())
                    manifest.reject_files.append(name)
                manifest.rows += len(records)
                manifest.rejected += len(rejects)
                manifest.cursor = reader.cursor
                manifest.seconds = seconds_before + time.perf_counter() - loop_started
                partial.save(manifest)
                bar.update(len(chunk))
                elapsed = time.perf_counter() - loop_started
                if elapsed > 0:
                    bar.set_postfix_str(f"{(manifest.tokens - tokens_before) / elapsed:,.0f} tok/s", refresh=False)
            manifest.input_done = True
            partial.save(manifest)
        bar.close()
        # Merge (redone by --resume if interrupted): temporary files in the partial folder, then os.replace
        # into place, the main output last.
        parts = [partial.path(name) for name in manifest.parts]
        final_tmp = partial.path("final.tmp")
        moves = []
        if out_format == "parquet":
            merge_parquet(parts, final_tmp, table_schema)
        else:
            ids_tmp = partial.path("ids.tmp")
            merge_npy(parts, final_tmp, ids_tmp, manifest.rows, embedder.embedding_dim)
            moves.append((ids_tmp, ids_path(output)))
        if skip_invalid or manifest.rejected:
            rejects_tmp = partial.path("rejects.tmp")
            with open(rejects_tmp, "wb") as handle:
                for name in manifest.reject_files:
                    with open(partial.path(name), "rb") as part:
                        handle.write(part.read())
                handle.flush()
                os.fsync(handle.fileno())
            moves.append((rejects_tmp, rejects_path(output)))
        moves.append((final_tmp, output))
        for source, destination in moves:
            os.replace(source, destination)
    except InputError:
        bar.close()
        _remove_if_empty(partial, manifest)
        raise
    except KeyboardInterrupt:
        bar.close()
        if manifest.parts or manifest.reject_files:
            message = (
                f"interrupted: {manifest.rows:,} records are kept in {partial.directory}; "
                f"rerun with --resume to continue"
            )
        else:
            partial.remove()
            message = "interrupted before the first chunk was written; nothing kept"
        typer.echo(message, err=True)
        raise typer.Exit(130) from None
    bar.close()

    partial.remove()

    if not quiet:
        seconds = time.perf_counter() - loop_started
        done = manifest.rows - rows_before
        rate = done / seconds if seconds > 0 else 0.0
        token_rate = (manifest.tokens - tokens_before) / seconds if seconds > 0 else 0.0
        resumed = f" ({rows_before:,} from the interrupted run)" if rows_before else ""
        rejected = manifest.rejected
        extra = f", {rejected:,} rejected (listed in {rejects_path(output)})" if rejected else ""
        typer.echo(
            f"encoded {manifest.rows:,} texts{resumed}{extra} in {seconds:.1f} s "
            f"(+{load_seconds:.1f} s loading the model): {rate:,.1f} texts/s, {token_rate:,.0f} tokens/s; "
            f"wrote {output} ({_size(os.path.getsize(output))})",
            err=True,
        )


def _split_line_break_ids(records: list[Any]) -> tuple[list[Any], list[Any]]:
    from tembed.io import Rejected

    kept, bad = [], []
    for record in records:
        if "\n" in record.id or "\r" in record.id:
            bad.append(Rejected(record.line_number, "the id holds a line break (not allowed in .ids.txt)"))
        else:
            kept.append(record)
    return kept, bad


def _remove_if_empty(partial: Any, manifest: Any) -> None:
    if not (manifest.parts or manifest.reject_files):
        partial.remove()


def _stop_on_bad_record(name: str, bad: Any, partial: Any, manifest: Any, output: str, rejects_path: Any) -> None:
    message = f"{name} line {bad.line_number}: {bad.reason}\n{output} was not written; "
    if manifest.parts or manifest.reject_files:
        message += (
            f"the {manifest.rows:,} records before are kept in {partial.directory}: rerun with "
            f"--resume --skip-invalid to skip bad records and continue, or fix the input and rerun with --restart"
        )
    else:
        partial.remove()
        message += f"rerun with --skip-invalid to skip bad records (they are listed in {rejects_path(output)})"
    raise _Stop(message)


if __name__ == "__main__":
    app()
