"""The ``tembed`` command line: one module per command, each importing what it needs only when it runs.

* ``tembed encode INPUT -o OUTPUT`` (:mod:`tembed.cli.encode`): a corpus file (or stdin) to parquet / npy,
  streamed and resumable, on one device or several (``--device cuda:0,cuda:1``);
* ``tembed models`` (:mod:`tembed.cli.models`): the registry; ``tembed info MODEL`` (:mod:`tembed.cli.info`): how
  a model resolves, without loading it;
* ``tembed embed TEXT...`` (:mod:`tembed.cli.embed`): a few texts to JSON arrays;
* ``tembed serve [MODEL]`` (:mod:`tembed.cli.serve`): the HTTP server (OpenAI, TEI and native M3 routes).
"""

from __future__ import annotations

import typer

from tembed.cli import embed, encode, info, models, serve

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Text embeddings: dense, sparse and ColBERT.")
app.command("models")(models.models_command)
app.command("info")(info.info_command)
app.command("embed")(embed.embed_command)
app.command("encode")(encode.encode_command)
app.command("serve")(serve.serve_command)

__all__ = ["app"]
