"""Corpus input and embedding output for ``tembed encode``: streaming readers, parquet / npy writers, resume.

Modules:

* :mod:`tembed.io.records`: :class:`Record` / :class:`Rejected` (the :data:`Item` a reader yields),
  :class:`InputError`, and the checks of a text value;
* :mod:`tembed.io.formats`: :func:`detect_format`, :func:`fingerprint`, ``count_items``, :data:`FORMATS`,
  :data:`STDIN`;
* :mod:`tembed.io.readers`: :class:`Reader` and its :data:`Cursor` (re-exports the two modules above);
* :mod:`tembed.io.parquet_input`: the parquet side of the reader (row groups, batches);
* :mod:`tembed.io.writers`: output columns, part files, the final merge;
* :mod:`tembed.io.files`: ``atomic_write`` and the other durable-write helpers;
* :mod:`tembed.io.checkpoint`: :class:`PartialRun` / :class:`Manifest` (``--resume``) and the output lock.
"""

from tembed.io.checkpoint import Manifest, PartialRun, ResumeError
from tembed.io.files import atomic_write, fsync_directory
from tembed.io.formats import FORMATS, STDIN, count_items, detect_format, fingerprint
from tembed.io.readers import Cursor, Reader
from tembed.io.records import InputError, Item, Record, Rejected
from tembed.io.writers import ids_path, output_format, rejects_path

__all__ = [
    "FORMATS",
    "STDIN",
    "Cursor",
    "InputError",
    "Item",
    "Manifest",
    "PartialRun",
    "Reader",
    "Record",
    "Rejected",
    "ResumeError",
    "atomic_write",
    "count_items",
    "detect_format",
    "fingerprint",
    "fsync_directory",
    "ids_path",
    "output_format",
    "rejects_path",
]
