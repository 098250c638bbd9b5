"""An evaluation's report: every metric under MTEB's names, the model and its effective settings, the data's
fingerprint, the options and the timings; as JSON (``--output``) and as a table for the terminal."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tembed.settings import Settings

SETTINGS_REPORTED = (
    "model", "path", "registry_entry", "family", "pooling", "normalize", "dim", "truncate_dim",
    "query_instruction", "query_instruction_format", "passage_instruction", "passage_instruction_format",
    "query_max_length", "passage_max_length", "max_seq_length", "precision", "effective_precision", "backend",
    "device", "batch_size", "max_batch_tokens",
)  # fmt: skip


def settings_record(settings: Settings) -> dict[str, Any]:
    """The effective settings a report records (how the vectors were made)."""
    return {name: getattr(settings, name) for name in SETTINGS_REPORTED}


@dataclass
class EvalReport:
    """What ``tembed eval`` measured.

    Attributes:
        task: ``"retrieval"`` or ``"sts"``.
        metrics: MTEB names -> values (retrieval: fractions in [0, 1]; STS: x 100, as MTEB's tables).
        model: the model's effective settings (:func:`settings_record`).
        data: where the data came from (paths, sizes, a hash of each file's first MiB) and its counts.
        options: the evaluation's options (mode, weights, quantization, ...).
        timings: seconds per step (``load``, ``encode_corpus``, ``encode_queries``, ``search``, ``metrics``).
        memory: bytes per vector of the searched representation (retrieval).
    """

    task: str
    metrics: dict[str, float]
    model: dict[str, Any]
    data: dict[str, Any]
    options: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from tembed import __version__

        return {**asdict(self), "tembed": __version__, "python": platform.python_version()}

    def save(self, path: str) -> None:
        """Write :meth:`to_dict` as indented JSON to ``path`` (atomically)."""
        from tembed.io.files import write_durably

        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        write_durably(path, (json.dumps(self.to_dict(), indent=2, default=_jsonable, allow_nan=False) + "\n").encode())

    def table(self) -> str:
        """The metrics as a table for the terminal (x 100, 2 decimals)."""
        title = f"{self.task}: {self.model.get('model')} ({self.model.get('backend')}, " + (
            f"{self.model.get('effective_precision')})"
        )
        if self.task == "sts":
            rows = [f"  {name:<18} {value:6.2f}" for name, value in self.metrics.items()]
            return "\n".join([title, *rows])
        by_measure: dict[str, dict[int, float]] = {}
        for name, value in self.metrics.items():
            measure, _, k = name.rpartition("_at_")
            by_measure.setdefault(measure, {})[int(k)] = value
        cutoffs = sorted({k for values in by_measure.values() for k in values})
        header = f"  {'x 100':<10}" + "".join(f"{'@' + str(k):>9}" for k in cutoffs)
        lines = [title, header]
        for measure, values in by_measure.items():
            cells = "".join(f"{100 * values[k]:9.2f}" if k in values else f"{'':>9}" for k in cutoffs)
            lines.append(f"  {measure:<10}{cells}")
        if self.timings:
            lines.append("  " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings.items()))
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
