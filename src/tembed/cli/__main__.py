"""``python -m tembed.cli``."""

from tembed.cli import app

if __name__ == "__main__":  # a worker process of a pool re-imports this module: it must not run the command
    app()
