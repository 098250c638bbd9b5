"""The ``tembed`` command line: one module per command, each importing what it needs only when it runs.

* ``tembed encode INPUT -o OUTPUT`` (:mod:`tembed.cli.encode`): a corpus file (or stdin) to parquet / npy,
  streamed and resumable, on one device or several (``--device cuda:0,cuda:1``);
* ``tembed models`` (:mod:`tembed.cli.models`): the registry; ``tembed info MODEL`` (:mod:`tembed.cli.info`): how
  a model resolves, without loading it;
* ``tembed embed TEXT...`` (:mod:`tembed.cli.embed`): a few texts to JSON arrays;
* ``tembed serve [MODEL]`` (:mod:`tembed.cli.serve`): the HTTP server (OpenAI, TEI and native M3 routes);
* ``tembed eval retrieval DATA_DIR`` / ``tembed eval sts FILE`` (:mod:`tembed.cli.eval`): metrics on your data.
"""

from __future__ import annotations

import typer

from tembed.cli import embed, encode, info, models, serve
from tembed.cli.eval import eval_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Text embeddings: dense, sparse and ColBERT.")
app.command("models")(models.models_command)
app.command("info")(info.info_command)
app.command("embed")(embed.embed_command)
app.command("encode")(encode.encode_command)
app.command("serve")(serve.serve_command)
app.add_typer(eval_app, name="eval")

__all__ = ["app"]
