"""``tembed info MODEL``: how a model resolves, from its files alone: no weights loaded, no export, no torch."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tembed.cli.common import MODEL_HELP, TRUST_REMOTE_CODE_HELP, parse_device
from tembed.models.registry import DEFAULT_MODEL

Model = Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)]
Device = Annotated[str, typer.Option("--device", help="The device to plan for: cpu, cuda, cuda:N, mps.")]
Backend = Annotated[str, typer.Option("--backend", help="auto, torch, onnx or openvino.")]
Precision = Annotated[str, typer.Option("--precision", help="auto, fp32, fp16, bf16 or int8 (CPU).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)]


def info_command(
    model: Model = DEFAULT_MODEL,
    device: Device = "cpu",
    backend: Backend = "auto",
    precision: Precision = "auto",
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Show how a model resolves: files, family, pooling, instructions, dimension, max lengths, backend and
    precision, read from the registry and the model's files without loading it."""
    from tembed.settings import EmbedderConfig, resolve_settings

    devices = parse_device(device)
    planned_device = (devices[0] if isinstance(devices, list) else devices) or "cpu"
    try:
        config = EmbedderConfig(
            model=model, backend=backend, precision=precision, trust_remote_code=trust_remote_code or None
        )
        settings, _ = resolve_settings(config, planned_device)
    except (OSError, ValueError, TypeError) as error:  # not found, unreadable files, a bad option: one line
        typer.echo(f"error: cannot resolve {model}: {type(error).__name__}: {error}", err=True)
        raise typer.Exit(2) from None
    info = {"model": model, **settings.as_dict(), "embedding_dim": settings.dim}
    if settings.device == "cpu":  # what picks the CPU engines (int8: tembed.backends.cpu.int8_engine)
        from tembed.backends.cpu import describe_cpu

        info["cpu"] = describe_cpu()
    typer.echo(json.dumps(info, indent=2, ensure_ascii=False))
