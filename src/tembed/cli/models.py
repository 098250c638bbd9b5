"""``tembed models``: the registry, without importing torch or reading any model."""

from __future__ import annotations

import typer


def models_command() -> None:
    """List the registry: model families, pooling, instructions, max lengths."""
    from tembed.models.registry import list_models

    rows = [("name", "family", "pooling", "query instruction", "max len")]
    for spec in list_models():
        instruction = (spec.query_instruction or "").replace("\n", "\\n")
        rows.append(
            (spec.hub_id or spec.name, spec.family, spec.pooling, instruction[:40], str(spec.passage_max_length))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
