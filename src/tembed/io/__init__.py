"""Corpus input and embedding output for ``tembed encode``: streaming readers, parquet / npy writers, resume."""

from tembed.io.checkpoint import Manifest, PartialRun, ResumeError
from tembed.io.readers import FORMATS, InputError, Reader, Record, Rejected, detect_format, fingerprint
from tembed.io.writers import ids_path, output_format, rejects_path

__all__ = [
    "FORMATS",
    "InputError",
    "Manifest",
    "PartialRun",
    "Reader",
    "Record",
    "Rejected",
    "ResumeError",
    "detect_format",
    "fingerprint",
    "ids_path",
    "output_format",
    "rejects_path",
]
