"""The state of an unfinished ``tembed encode`` run: ``OUTPUT.partial/`` with numbered parts and a manifest.

Layout::

    OUTPUT.partial/
        manifest.json          # input fingerprint, options, reader cursor, the parts done (replaced atomically)
        part-000000.parquet    # one encoded chunk each (a single row group), fsynced before the manifest names it
        rejects-000000.jsonl   # the records of that chunk that were skipped (``--skip-invalid``), if any

A part or rejects file the manifest does not name (a run killed between writing it and updating the manifest) is
deleted on resume, so a resumed run continues from exactly the last recorded chunk: no duplicate, no gap.
Nothing is written at OUTPUT itself until the merge, which writes a temporary file inside the partial folder and
moves it into place with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from tembed.io.writers import write_durably

MANIFEST_VERSION = 1


class ResumeError(Exception):
    """A partial run cannot be resumed (different input or options), or is in the way of a fresh run."""


@dataclass
class Manifest:
    """What a partial run has done so far."""

    input: dict[str, Any]
    options: dict[str, Any]
    cursor: dict[str, int] = field(default_factory=lambda: {"offset": 0, "line": 0, "row": 0})
    parts: list[str] = field(default_factory=list)
    reject_files: list[str] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    tokens: int = 0
    seconds: float = 0.0
    input_done: bool = False
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()


class PartialRun:
    """The ``OUTPUT.partial`` folder of one output path."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.directory = output + ".partial"
        self.manifest_path = os.path.join(self.directory, "manifest.json")

    def exists(self) -> bool:
        return os.path.isdir(self.directory)

    def load(self) -> Manifest:
        try:
            with open(self.manifest_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None  # type: ignore[return-value]
        except (OSError, ValueError) as error:
            raise ResumeError(f"{self.manifest_path} is unreadable ({error}); remove {self.directory}") from None
        if data.get("version") != MANIFEST_VERSION:
            raise ResumeError(f"{self.manifest_path} was written by another tembed version; remove {self.directory}")
        return Manifest(**data)

    def start(self, manifest: Manifest) -> None:
        """Begin a fresh run: an empty folder holding only the manifest."""
        if self.exists():
            shutil.rmtree(self.directory)
        os.makedirs(self.directory)
        self.save(manifest)

    def resume(self, input_fingerprint: dict[str, Any], options: dict[str, Any]) -> Manifest | None:
        """The manifest of the run to continue, after checking it matches; None when there is nothing to resume."""
        if not self.exists():
            return None
        manifest = self.load()
        if manifest is None:  # killed before its first manifest: nothing was done
            return None
        if manifest.input != input_fingerprint:
            changed = [key for key in input_fingerprint if manifest.input.get(key) != input_fingerprint[key]]
            raise ResumeError(
                f"cannot resume: the input changed since the interrupted run ({', '.join(changed)} differ: "
                f"{manifest.input.get('path')}); rerun with --restart to start over"
            )
        if manifest.options != options:
            changed = [
                f"{key} {manifest.options.get(key)!r} -> {options.get(key)!r}"
                for key in sorted(set(options) | set(manifest.options))
                if manifest.options.get(key) != options.get(key)
            ]
            raise ResumeError(
                f"cannot resume: options differ from the interrupted run ({'; '.join(changed)}); "
                f"rerun with the same options, or with --restart to start over"
            )
        known = set(manifest.parts) | set(manifest.reject_files) | {"manifest.json"}
        for name in os.listdir(self.directory):
            if name not in known:  # written after the last manifest update: redone from the cursor
                os.remove(os.path.join(self.directory, name))
        return manifest

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def save(self, manifest: Manifest) -> None:
        write_durably(self.manifest_path, manifest.to_json())

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
