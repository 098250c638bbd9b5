"""What several commands share: help texts and the ``--device`` syntax."""

from __future__ import annotations

import typer

MODEL_HELP = "Folder, registry name or hub id."
TRUST_REMOTE_CODE_HELP = (
    "Run the checkpoint's own Python code (auto_map in config.json). Off by default; the registry turns it on only "
    "for the exact hub ids that need it."
)
DEVICE_HELP = (
    "cpu, cuda, cuda:N, mps, or several separated by commas (cuda:0,cuda:1 or cpu,cpu: one worker process each)"
)


def parse_device(value: str | None) -> str | list[str] | None:
    """``--device``: None (auto), one device, or a list of several (a worker pool).

    Raises:
        typer.BadParameter: an empty entry (``"cpu,"``).
    """
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise typer.BadParameter(f"{value!r}: name each device (cpu, cuda, cuda:N, mps), separated by commas")
    return names[0] if len(names) == 1 else names
