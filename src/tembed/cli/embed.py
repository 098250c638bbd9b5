"""``tembed embed TEXT...``: a few texts to dense vectors, one JSON array per line."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from tembed.cli.common import DEVICE_HELP, MODEL_HELP, TRUST_REMOTE_CODE_HELP, parse_device
from tembed.models.registry import DEFAULT_MODEL
from tembed.types import Role

KIND_HELP = "query (the query instruction and length), passage (the passage instruction, if any) or plain."


Texts = Annotated[list[str], typer.Argument(metavar="TEXT", help="Texts to embed.")]
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
Kind = Annotated[Role, typer.Option("--kind", help=KIND_HELP)]
Device = Annotated[str | None, typer.Option("--device", help=DEVICE_HELP + " (default: auto).")]
Backend = Annotated[str, typer.Option("--backend", help="auto, torch, onnx or openvino.")]
Precision = Annotated[str, typer.Option("--precision", help="auto, fp32, fp16, bf16 or int8 (CPU).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)]


def embed_command(
    texts: Texts,
    model: Model = DEFAULT_MODEL,
    kind: Kind = Role.PLAIN,
    device: Device = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Embed a few texts and print one JSON array per line."""
    from tembed.encoder import open_encoder
    from tembed.settings import EmbedderConfig, EncodeOptions

    config = EmbedderConfig(
        model=model,
        backend=backend,
        precision=precision,
        outputs=("dense",),
        trust_remote_code=trust_remote_code or None,
    )
    encoder = open_encoder(config, parse_device(device))
    try:
        dense = encoder.encode(texts, EncodeOptions(role=kind)).dense
    finally:
        encoder.close()
    for vector in dense if dense is not None else ():
        sys.stdout.write(json.dumps([round(float(x), 7) for x in vector]) + "\n")
