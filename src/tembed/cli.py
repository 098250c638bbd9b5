"""The ``tembed`` command line.

* ``tembed encode INPUT -o OUTPUT``: embed a corpus file (or stdin) to parquet / npy, streaming, resumable;
* ``tembed models``: the registry; ``tembed info MODEL``: how a model resolves;
* ``tembed embed TEXT...``: a few texts to JSON arrays.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer

from tembed.models.registry import DEFAULT_MODEL, list_models

TRUST_REMOTE_CODE_HELP = (
    "Run the checkpoint's own Python code (auto_map in config.json). Off by default; the registry turns it on only "
    "for the exact hub ids that need it."
)

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
def info_command(
    model: str = typer.Argument(DEFAULT_MODEL, help="Folder, registry name or hub id."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Show how a model resolves: files, family, pooling, instructions, dimension and max length."""
    from tembed import Embedder

    with Embedder(model, device="cpu", trust_remote_code=trust_remote_code or None) as embedder:
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
            "effective_precision": embedder.effective_precision,
        }
    typer.echo(json.dumps(info, indent=2, ensure_ascii=False))


@app.command("embed")
def embed_command(
    texts: list[str] = typer.Argument(..., help="Texts to embed."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Folder, registry name or hub id."),
    kind: str = typer.Option("plain", "--kind", help="query, passage or plain."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: auto)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Embed a few texts and print one JSON array per line."""
    from tembed import Embedder

    with Embedder(model, device=device, trust_remote_code=trust_remote_code or None) as embedder:
        method = {"query": embedder.encode_queries, "passage": embedder.encode_corpus, "plain": embedder.encode}
        if kind not in method:
            raise typer.BadParameter(f"--kind must be query, passage or plain, got {kind!r}")
        for vector in method[kind](texts):
            sys.stdout.write(json.dumps([round(float(x), 7) for x in vector]) + "\n")


# ------------------------------------------------------------------------------------------------------ encode
KINDS = ("passage", "query", "plain")
DEFAULT_CHUNK_SIZE = 2048
CHUNK_OUTPUT_BYTES = 64_000_000
"""With --colbert or --sparse, a chunk also ends once the estimated output of its records reaches this many bytes
(ColBERT: tokens x dim x 4; sparse: tokens x SPARSE_BYTES_PER_TOKEN), so long texts do not multiply the memory.
A chunk's output is held several times over while it is converted and written (about 6x measured), hence 64 MB."""
SPARSE_BYTES_PER_TOKEN = 100
"""Python dict entries of a sparse output (an int key and a float weight), per token, as an estimate."""


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


def _chunks(reader: Any, size: int, weigh: Any = None, budget: int = 0) -> Iterator[list[Any]]:
    """Items in chunks of ``size``; with ``weigh`` (a record's estimated output bytes), a chunk also ends as soon as
    its records reach ``budget`` bytes. A chunk ends right after an item, so the reader's cursor is exact."""
    chunk: list[Any] = []
    weight = 0
    for item in reader:
        chunk.append(item)
        if weigh is not None and not hasattr(item, "reason"):
            weight += weigh(item)
        if len(chunk) >= size or (weigh is not None and weight >= budget):
            yield chunk
            chunk = []
            weight = 0
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
    unique_ids: bool = typer.Option(
        False, "--unique-ids", help="A record whose id an earlier record has is a bad record (default: counted only)."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
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
        with contextlib.ExitStack() as held:  # what the run holds to its end (the output's lock), released last
            _encode(**arguments, held=held)
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
    held: contextlib.ExitStack,
    trust_remote_code: bool = False,
    unique_ids: bool = False,
) -> None:
    from tembed.io import InputError, Manifest, PartialRun, Reader, ResumeError, fingerprint, output_format
    from tembed.io.checkpoint import OutputLock, OutputLocked
    from tembed.io.readers import STDIN, count_items, detect_format

    if kind not in KINDS:
        raise _Stop(f"--kind must be passage, query or plain, got {kind!r}", 2)
    if resume and restart:
        raise _Stop("--resume and --restart contradict each other: pick one", 2)
    if input_path != STDIN and os.path.isdir(input_path):
        raise _Stop(f"{input_path}: is a directory, not a file", 2)
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
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise _Stop(f"{output}: {directory} is not a folder", 2)
    if not os.path.isdir(directory):
        raise _Stop(f"{output}: the folder {directory} does not exist", 2)
    if input_path != STDIN:
        _refuse_overwriting_the_input(input_path, output, out_format)

    # Held until the run ends, before anything else is read or written at OUTPUT: a second run on the same output
    # would otherwise delete the first one's parts (--resume drops unrecorded files) or interleave with them.
    # Creating the lock file is also the first write: a read-only or full output folder is reported here.
    lock = OutputLock(output)
    try:
        lock.acquire()
    except OutputLocked as error:
        raise _Stop(str(error), 2) from None
    except OSError as error:
        raise _Stop(_cannot_write(output, error, lock.path), 1) from None
    held.callback(lock.release)

    partial = PartialRun(output)
    if partial.exists() and not os.access(partial.directory, os.W_OK):
        denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        raise _Stop(_cannot_write(output, denied, partial.directory), 1)
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
        "trust_remote_code": bool(trust_remote_code),
    }
    manifest = None
    try:
        if resume:
            manifest = partial.resume(source, options)
        elif partial.exists() and not restart:
            if input_path == STDIN:  # --resume is refused for stdin: only --restart helps
                advice = "pass --restart to discard it and start over (a run reading stdin cannot be resumed)"
            else:
                advice = "pass --resume to continue it, or --restart to discard it and start over"
            raise _Stop(f"an interrupted run left {partial.directory}: {advice}", 2)
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
            trust_remote_code=trust_remote_code or None,  # unset: the registry decides
        )
    except Exception as error:  # any loader failure (a failed ONNX export too) in one line; not KeyboardInterrupt
        raise _Stop(f"cannot load {model}: {_one_line(error)}", 2) from None
    load_seconds = time.perf_counter() - load_started
    fresh = manifest is None
    try:
        # What the vectors depend on that is known only now: checked before anything is encoded.
        loaded = _loaded_model(embedder)
        if manifest is None:
            manifest = Manifest(input=source, options=options, model=loaded)
        else:
            try:
                partial.check_model(manifest, loaded, embedder.resolved.path)
            except ResumeError as error:
                raise _Stop(str(error), 2) from None
        _run(
            embedder=embedder,
            partial=partial,
            manifest=manifest,
            fresh=fresh,
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
            unique_ids=unique_ids,
        )
    except InputError as error:
        raise _Stop(str(error)) from None
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS or _names(error.filename, input_path):
            raise
        raise _Stop(_write_failed(output, error, partial, stdin=input_path == STDIN), 1) from None
    finally:
        _close_embedder(embedder)


# A write failing with one of these is the output's fault (full, read-only, forbidden), not a bug: one line, no
# traceback, and what is kept.
_WRITE_ERRNOS = frozenset(
    code
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, getattr(errno, "EDQUOT", None))
    if code is not None
)


def _names(filename: Any, path: str) -> bool:
    """Whether an error's filename is ``path`` (an unreadable input is not a write failure)."""
    if not isinstance(filename, (str, bytes, os.PathLike)) or path == "-":
        return False
    return os.path.abspath(os.fsdecode(filename)) == os.path.abspath(path)


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _cannot_write(output: str, error: OSError, path: str | None = None) -> str:
    reason = error.strerror or _one_line(error)
    where = path or (os.fsdecode(error.filename) if isinstance(error.filename, (str, bytes)) else None)
    return f"cannot write {output}" + (f" ({where})" if where and where != output else "") + f": {reason}"


def _write_failed(output: str, error: OSError, partial: Any, *, stdin: bool) -> str:
    """The one line for a run stopped by a failed write: the path, the reason, and the records kept."""
    from tembed.io import ResumeError

    message = _cannot_write(output, error)
    try:
        saved = partial.load() if partial.exists() else None  # what the last durable manifest records
    except ResumeError:
        saved = None
    if saved is not None and saved.rows and not stdin:
        with contextlib.suppress(OSError):
            partial.drop_unrecorded(saved)  # the half-written part or merge: room for the rest
        return (
            f"{message}; {saved.rows:,} records are kept in {partial.directory}, rerun with --resume when there is room"
        )
    partial.remove()
    if saved is not None and saved.rows:  # stdin: nothing to resume from
        return f"{message}; a run reading stdin cannot be resumed, so nothing is kept: rerun when there is room"
    return f"{message}; nothing is kept: rerun when there is room"


def _refuse_overwriting_the_input(input_path: str, output: str, out_format: str) -> None:
    """Stop before anything is written if the output, its ids / rejects / lock file or partial folder is the input."""
    from tembed.io.checkpoint import PartialRun
    from tembed.io.writers import ids_path, rejects_path

    targets = [("the output", output)]
    if out_format == "npy":
        targets.append((f"the ids file of {output}", ids_path(output)))
    targets.append((f"the rejects file of {output}", rejects_path(output)))
    targets.append((f"the lock file of {output}", output + ".lock"))
    real_input = os.path.realpath(input_path)
    for what, path in targets:
        if os.path.realpath(path) == real_input or (os.path.exists(path) and os.path.samefile(path, input_path)):
            raise _Stop(f"{path} is the input file: writing {what} would destroy it; choose another --output", 2)
    partial = os.path.realpath(PartialRun(output).directory)
    if real_input.startswith(partial + os.sep):
        raise _Stop(f"the input {input_path} is inside {output}.partial, which the run replaces; move it first", 2)


def _loaded_model(embedder: Any) -> dict[str, Any]:
    """What the vectors depend on beyond the options, known once the model is loaded (recorded for --resume).

    The batch size is left out on purpose: batches are sorted by length and padding is masked, so it changes a
    vector by float rounding only (~1e-6), and a run stopped by running out of memory must be able to resume with
    a smaller one.
    """
    from tembed.io.checkpoint import model_fingerprint

    devices = embedder.device if isinstance(embedder.device, (list, tuple)) else [embedder.device]
    return {
        "backend": embedder.backend_name,
        "device": ",".join(sorted({getattr(device, "type", str(device)) for device in devices})),
        "files": model_fingerprint(embedder.resolved.path),
    }


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
    unique_ids: bool = False,
) -> None:
    from tqdm.auto import tqdm

    from tembed.io import InputError, Rejected
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
    rejected_before = manifest.rejected
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
    known_ids = _IdHashes(keep_lines=unique_ids)
    weigh = _output_weigher(embedder, outputs, colbert_dim, instruction, instruction_format, token_limit)
    try:
        if manifest.parts:  # the ids the interrupted run wrote, for duplicate counting / refusal
            _reload_ids(known_ids, [partial.path(name) for name in manifest.parts], reader_factory, manifest.cursor)
        if not manifest.input_done:
            for chunk in _chunks(reader, chunk_size, weigh, CHUNK_OUTPUT_BYTES):
                records = [item for item in chunk if not hasattr(item, "reason")]
                rejects = [item for item in chunk if hasattr(item, "reason")]
                if out_format == "npy":
                    records, line_breaks = _split_line_break_ids(records)
                    rejects = sorted(rejects + line_breaks, key=lambda item: item.line_number)
                if unique_ids:
                    records, duplicates = known_ids.refuse_duplicates(records)
                    rejects = sorted(rejects + duplicates, key=lambda item: item.line_number)
                if rejects and not skip_invalid:
                    _stop_on_bad_record(reader.name, rejects[0], partial, manifest, output, rejects_path)
                index = len(manifest.parts) + len(manifest.reject_files)
                if records:
                    try:
                        result = encode([r.text for r in records], max_length=token_limit, outputs=outputs)
                    except Exception as error:  # any library failure: named with its lines, never a traceback
                        if not skip_invalid:
                            _stop_on_encode_error(reader.name, records, error, partial, manifest, output, rejects_path)
                        # --skip-invalid: encode by halves down to the texts that fail; reject only those
                        try:
                            records, result, failures = _encode_by_halves(encode, records, token_limit, outputs, error)
                        except _NotTheTexts:
                            _stop_on_encode_error(reader.name, records, error, partial, manifest, output, rejects_path)
                        failed = [Rejected(r.line_number, f"encoding failed: {_error_text(e)}") for r, e in failures]
                        rejects = sorted(rejects + failed, key=lambda item: item.line_number)
                if records:
                    texts = [record.text for record in records]
                    name = f"part-{index:06d}.parquet"
                    write_part(partial.path(name), chunk_table([r.id for r in records], result, table_schema))
                    manifest.parts.append(name)
                    known_ids.add(records)
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
        if (manifest.parts or manifest.reject_files) and manifest.input.get("path") == "-":
            message = (
                f"interrupted: a run reading stdin cannot be resumed; rerun with --restart to start over "
                f"(it discards the {manifest.rows:,} records in {partial.directory}), or remove that folder"
            )
        elif manifest.parts or manifest.reject_files:
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
        duplicates = manifest.rows - known_ids.distinct
        if duplicates:
            extra += f", {duplicates:,} duplicate ids (--unique-ids refuses them)"
        wrote = f"wrote {output} ({_size(os.path.getsize(output))})"
        if not fresh and done == 0 and manifest.rejected == rejected_before:
            typer.echo(
                f"nothing left to encode: all {manifest.rows + manifest.rejected:,} records were done by the "
                f"interrupted run{extra}; {wrote}",
                err=True,
            )
            return
        typer.echo(
            f"encoded {manifest.rows:,} texts{resumed}{extra} in {seconds:.1f} s "
            f"(+{load_seconds:.1f} s loading the model): {rate:,.1f} texts/s, {token_rate:,.0f} tokens/s; {wrote}",
            err=True,
        )


def _error_text(error: BaseException) -> str:
    """``Type: message`` on one line, at most about 500 characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 500 else text[:497] + "..."


class _NotTheTexts(Exception):
    """Encoding fails whatever the texts: the run must stop, not reject every record."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _encode_by_halves(
    encode: Any, records: list[Any], max_length: int, outputs: tuple[str, ...], error: BaseException
) -> tuple[list[Any], Any, list[tuple[Any, BaseException]]]:
    """Encode records whose chunk failed as a whole (with ``error``): by halves, down to the single texts that fail.

    Returns the records encoded, their outputs (one :class:`~tembed.outputs.EncodeOutputs`, in their order) and
    ``(record, error)`` for each text that fails on its own. Costs about twice the chunk's encoding per failing text.
    """
    from tembed.outputs import EncodeOutputs

    chunk_error = error
    done: list[Any] = []
    results: list[Any] = []
    failures: list[tuple[Any, BaseException]] = []

    def attempt(part: list[Any], known_error: BaseException | None = None) -> None:
        if known_error is None:
            try:
                results.append(encode([r.text for r in part], max_length=max_length, outputs=outputs))
                done.extend(part)
                return
            except Exception as error:
                known_error = error
        if len(part) == 1:
            failures.append((part[0], known_error))
            if not done and len(failures) == 2 and all(_error_text(e) == _error_text(chunk_error) for _, e in failures):
                # Two texts fail alone as the whole chunk did, and none succeeded: the fault is not in the texts
                # (a broken device, a closed model). Rejecting every record would hide it.
                raise _NotTheTexts(chunk_error)
            return
        middle = len(part) // 2
        attempt(part[:middle])
        attempt(part[middle:])

    attempt(records, known_error=error)
    result = results[0] if len(results) == 1 else EncodeOutputs.concatenate(results) if results else None
    return done, result, failures


def _stop_on_encode_error(
    name: str, records: list[Any], error: BaseException, partial: Any, manifest: Any, output: str, rejects_path: Any
) -> None:
    first, last = records[0].line_number, records[-1].line_number
    where = f"line {first}" if first == last else f"lines {first}-{last}"
    head = f"{name} {where}: encoding failed: {_error_text(error)}"
    _stop_on_bad_record(name, records[0], partial, manifest, output, rejects_path, head=head)


_SPECIAL_TOKENS_BOUND = 4  # CLS / SEP / BOS / EOS a tokenizer adds around a text


def _output_weigher(
    embedder: Any,
    outputs: tuple[str, ...],
    colbert_dim: int | None,
    instruction: str | None,
    instruction_format: str | None,
    token_limit: int,
) -> Any:
    """With --colbert or --sparse: a function giving a bound on a record's output bytes (its tokens times the bytes
    per token), for :func:`_chunks`; None for dense only (a fixed size).

    A text has at most as many tokens as its UTF-8 bytes (a byte-level tokenizer's worst case) plus the special
    tokens, and never more than the max length: that bound costs no tokenizer pass over the corpus (the encode
    step tokenizes each text once), at the price of chunks smaller than the budget for most text."""
    if "colbert" not in outputs and "sparse" not in outputs:
        return None
    from tembed.text import apply_instruction

    per_token = (4 * (colbert_dim or 0) if "colbert" in outputs else 0) + (
        SPARSE_BYTES_PER_TOKEN if "sparse" in outputs else 0
    )
    fixed = 4 * embedder.embedding_dim if "dense" in outputs else 0

    def weigh(record: Any) -> int:
        try:
            prepared = apply_instruction([record.text], instruction, instruction_format)[0]
            tokens = min(token_limit, len(prepared.encode("utf-8", "surrogatepass")) + _SPECIAL_TOKENS_BOUND)
        except Exception:  # the encode step reports it; count the most a text can take
            tokens = token_limit
        return fixed + tokens * per_token

    return weigh


class _IdHashes:
    """The distinct ids written so far, as 64-bit hashes (blake2b) in a few sorted numpy runs.

    8 bytes per distinct id (16 with ``keep_lines``, which also keeps the line of each id's first record, for
    ``--unique-ids``' message), plus a transient copy while two runs merge; lookups are vectorized per chunk. Two
    different ids share a hash with a chance of about n^2 / 2^65 (n ids): 3e-4 for 100 million.
    """

    def __init__(self, keep_lines: bool) -> None:
        self.keep_lines = keep_lines
        self._runs: list[tuple[Any, Any]] = []  # (sorted hashes, their first lines or None), largest first

    @property
    def distinct(self) -> int:
        return sum(len(keys) for keys, _ in self._runs)

    @staticmethod
    def hashes(ids: list[str]) -> Any:
        import hashlib

        import numpy as np

        return np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
                for i in ids
            ),
            dtype=np.uint64,
            count=len(ids),
        )

    def lookup(self, hashes: Any) -> tuple[Any, Any]:
        """For each hash: whether it was seen, and the line it was first seen at (0 when not kept)."""
        import numpy as np

        found = np.zeros(len(hashes), dtype=bool)
        lines = np.zeros(len(hashes), dtype=np.int64)
        for keys, key_lines in self._runs:
            if not len(keys):
                continue
            at = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
            hit = keys[at] == hashes
            if key_lines is not None:
                lines[hit] = key_lines[at[hit]]
            found |= hit
        return found, lines

    def refuse_duplicates(self, records: list[Any]) -> tuple[list[Any], list[Any]]:
        """``(kept, rejected)``: a record whose id was written before, or is earlier in ``records``, is rejected."""
        import numpy as np

        from tembed.io import Rejected

        if not records:
            return records, []
        hashes = self.hashes([r.id for r in records])
        found, lines = self.lookup(hashes)
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        first_of = first[inverse.reshape(-1)]
        kept, rejected = [], []
        for position, record in enumerate(records):
            if found[position]:
                earlier = int(lines[position])
            elif first_of[position] != position:
                earlier = records[first_of[position]].line_number
            else:
                kept.append(record)
                continue
            where = f"line {earlier} has it too" if earlier else "the interrupted run wrote it already"
            rejected.append(Rejected(record.line_number, f"duplicate id {record.id!r} ({where})"))
        return kept, rejected

    def add(self, records: list[Any], hashes: Any = None, lines: Any = None) -> None:
        """Add the ids of records written (those seen before are counted once)."""
        import numpy as np

        if hashes is None:
            hashes = self.hashes([r.id for r in records])
            lines = np.fromiter((r.line_number for r in records), dtype=np.int64, count=len(records))
        found, _ = self.lookup(hashes)
        keys, first = np.unique(hashes[~found], return_index=True)
        if not len(keys):
            return
        self._runs.append((keys, lines[~found][first] if self.keep_lines else None))
        # Merge runs of similar size (a binary counter): O(log n) runs, each id merged O(log n) times.
        while len(self._runs) >= 2 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (keys_a, lines_a), (keys_b, lines_b) = self._runs[-2], self._runs[-1]
            merged = np.concatenate([keys_a, keys_b])
            order = np.argsort(merged, kind="stable")
            merged_lines = None if lines_a is None else np.concatenate([lines_a, lines_b])[order]
            self._runs[-2:] = [(merged[order], merged_lines)]

    def fill_lines(self, hashes: Any, lines: Any) -> None:
        """Set the first line of ids whose line is not known yet (0), from records in file order."""
        import numpy as np

        keys_unique, first = np.unique(hashes, return_index=True)
        for keys, key_lines in self._runs:
            if key_lines is None or not len(keys):
                continue
            at = np.minimum(np.searchsorted(keys, keys_unique), len(keys) - 1)
            hit = (keys[at] == keys_unique) & (key_lines[at] == 0)
            key_lines[at[hit]] = lines[first[hit]]


def _reload_ids(known: _IdHashes, parts: list[str], reader_factory: Any, cursor: dict[str, int]) -> None:
    """On --resume: the ids in the parts already written; with --unique-ids also the line of each, by reading the
    input again up to where the interrupted run stopped (ids only; nothing is encoded)."""
    import numpy as np
    import pyarrow.parquet as pq

    for part in parts:
        ids = pq.read_table(part, columns=["id"]).column("id").to_pylist()
        known.add([], known.hashes(ids), np.zeros(len(ids), dtype=np.int64))
    if not known.keep_lines:
        return
    last_line = max(cursor.get("line", 0), cursor.get("row", 0))
    batch: list[Any] = []
    for item in reader_factory(None):
        if item.line_number > last_line:
            break
        if not hasattr(item, "reason"):
            batch.append(item)
        if len(batch) >= 65536:
            known.fill_lines(known.hashes([r.id for r in batch]), np.array([r.line_number for r in batch]))
            batch = []
    if batch:
        known.fill_lines(known.hashes([r.id for r in batch]), np.array([r.line_number for r in batch]))


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


def _stop_on_bad_record(
    name: str, bad: Any, partial: Any, manifest: Any, output: str, rejects_path: Any, head: str | None = None
) -> None:
    message = f"{head or f'{name} line {bad.line_number}: {bad.reason}'}\n{output} was not written; "
    if (manifest.parts or manifest.reject_files) and manifest.input.get("path") == "-":  # stdin: no --resume
        message += (
            "a run reading stdin cannot be resumed: rerun with --restart --skip-invalid to skip bad records, "
            "or fix the input and rerun with --restart"
        )
    elif manifest.parts or manifest.reject_files:
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
