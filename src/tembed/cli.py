"""The ``tembed`` command line: ``tembed models``, ``tembed info MODEL``, ``tembed embed TEXT...``."""

from __future__ import annotations

import json
import sys

import typer

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


if __name__ == "__main__":
    app()
