"""What the ONNX Runtime and OpenVINO backends share: the export they read, its rebuild when unreadable, feeds and
outputs."""

from __future__ import annotations

import abc
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from tembed.backends import export
from tembed.backends.base import BackendOutput, TokenBatch

if TYPE_CHECKING:
    from types import FrameType

    from tembed.backends.base import Backend

_T = TypeVar("_T")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../tembed


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning given by the caller of this function name the first frame outside
    the tembed package (the code that asked for the Embedder), however deep inside tembed the backend is built."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame = frame.f_back
        level += 1
    return level


def cpu_threads() -> int:
    """The threads an inference engine uses: torch's intra-op setting (``torch.set_num_threads``), at least 1."""
    return max(1, torch.get_num_threads())


def onnx_feed(batch: TokenBatch, input_names: list[str]) -> dict[str, np.ndarray]:
    """The export's inputs for a batch (zero ``token_type_ids`` where the export takes them and the batch has none)."""
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if "token_type_ids" in input_names:
        feed["token_type_ids"] = (
            batch.token_type_ids if batch.token_type_ids is not None else np.zeros_like(batch.input_ids)
        )
    return feed


class OnnxBackendBase(abc.ABC):
    """A backend on the cached ONNX export of a model folder (see :mod:`tembed.backends.export`), on the CPU.

    Attributes:
        precision: the precision asked for (``effective_precision``: the one really run).
        onnx_path: the fp32 export.
        input_names: the export's inputs.
    """

    device = torch.device("cpu")
    effective_precision: str

    def __init__(self, path: str, *, precision: str, masked_lm: bool, trust_remote_code: bool) -> None:
        from transformers import AutoConfig

        self.precision = precision
        self.config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.hidden_size = int(self.config.hidden_size)
        self.masked_lm = masked_lm
        self._export_args = (path, masked_lm, trust_remote_code)
        self._export()

    @classmethod
    def create(
        cls,
        path: str,
        *,
        device: torch.device,
        precision: str,
        dtype: torch.dtype,
        trust_remote_code: bool,
        masked_lm: bool,
    ) -> Backend:
        """The :class:`tembed.backends.base.BackendFactory` entry point: ``precision="auto"`` is fp32; ``device``
        (the CPU: see :func:`tembed.backends.choose_backend`) and ``dtype`` are not used."""
        concrete = "fp32" if precision == "auto" else precision
        return cls(path, precision=concrete, masked_lm=masked_lm, trust_remote_code=trust_remote_code)

    @abc.abstractmethod
    def forward(self, batch: TokenBatch, *, want_logits: bool = False, pooling: str | None = None) -> BackendOutput:
        """The last hidden state (and logits for masked-LM exports) as CPU float32 tensors (see
        :meth:`tembed.backends.base.Backend.forward`)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the compiled model; later calls are refused."""

    def _export(self) -> None:
        path, masked_lm, trust_remote_code = self._export_args
        self.onnx_path = export.export_onnx(path, masked_lm=masked_lm, trust_remote_code=trust_remote_code)
        self.input_names: list[str] = export.read_export_info(os.path.dirname(self.onnx_path))["inputs"]

    def _load(self, open_export: Callable[[str], _T]) -> _T:
        """``open_export(self.onnx_path)``. If that fails (other than for a missing package or a file-system error),
        the cached export (or a file derived from it) is taken for unreadable: its folder is removed, the model
        exported again and opened once more, with a warning; a second failure raises."""
        try:
            return open_export(self.onnx_path)
        except Exception as error:
            if isinstance(error, ImportError) or (isinstance(error, OSError) and error.errno is not None):
                raise  # not the cache's fault (a missing package, a full disk, a permission): a rebuild cannot help
            folder = os.path.dirname(self.onnx_path)
            broken = export.describe_unreadable(folder, error)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            self._export()
            loaded = open_export(self.onnx_path)
        except Exception as error:
            raise RuntimeError(f"{broken}; rebuilding it failed too ({type(error).__name__}: {error})") from error
        warnings.warn(f"{broken}; rebuilt it", stacklevel=caller_stacklevel())
        return loaded

    def _check(self, want_logits: bool) -> None:
        if want_logits and not self.masked_lm:
            raise ValueError("this model was loaded without a masked-LM head: no vocabulary logits")

    @staticmethod
    def _output(arrays: list[np.ndarray], want_logits: bool) -> BackendOutput:
        hidden = torch.from_numpy(np.ascontiguousarray(arrays[0], dtype=np.float32))
        logits = torch.from_numpy(np.ascontiguousarray(arrays[1], dtype=np.float32)) if want_logits else None
        return BackendOutput(hidden=hidden, logits=logits)
