"""ONNX backends for fast CPU inference: ONNX Runtime and OpenVINO on one cached ONNX export.

The model is exported once with ``torch.onnx.export`` (dynamic batch and sequence axes; the exporter based on
``torch.export``, which traces transformers 5's attention masks correctly) and cached under
``$TEMBED_CACHE`` (default ``~/.cache/tembed``), keyed by the model's files and the export options, so a second
load does not re-export. Derived files (int8 weights) are cached beside it.

* :class:`OnnxRuntimeBackend`: ``precision="fp32"`` (faithful) or ``"int8"`` (dynamic quantization, per-channel
  weights).
* :class:`OpenVinoBackend`: ``"fp32"`` (faithful, f32 inference hint), ``"bf16"`` (AVX512-BF16 / AMX CPUs).

Both return the last hidden state (and, for masked-LM models, the vocabulary logits) as torch tensors, so the
heads (pooling, M3 sparse / ColBERT, SPLADE) run unchanged on their outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from tembed.backends import disable_openvino_telemetry
from tembed.backends.base import BackendOutput, TokenBatch

disable_openvino_telemetry()  # before anything here imports openvino or nncf
logger = logging.getLogger(__name__)
_T = TypeVar("_T")

EXPORT_VERSION = 1  # bump when the export recipe changes, to invalidate caches
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")
STALE_STAGING_SECONDS = 3600  # staging left by another machine (or a reused pid) is swept after this long


def cache_root() -> str:
    """Where exports are cached: ``$TEMBED_CACHE`` or ``~/.cache/tembed``."""
    return os.environ.get("TEMBED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tembed")


def _fingerprint(model_path: str, options: dict) -> str:
    """A key for the model's files (names, sizes, mtimes, first MiB of weights) and the export options."""
    import transformers

    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {**options, "export": EXPORT_VERSION, "torch": torch.__version__, "transformers": transformers.__version__},
            sort_keys=True,
        ).encode()
    )
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if not os.path.isfile(path) or not name.endswith(_WEIGHT_SUFFIXES):
            continue
        stat = os.stat(path)
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:24]


class _ExportWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, masked_lm: bool, with_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.masked_lm = masked_lm
        self.with_token_types = with_token_types

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.masked_lm:
            output = self.model(**kwargs, output_hidden_states=True, return_dict=True)
            return output.hidden_states[-1], output.logits
        return self.model(**kwargs, return_dict=True).last_hidden_state


def _staging_tag() -> str:
    """``HOST-PID`` of this process, put in staging names so a sweep can tell whether their creator still runs."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def _staging_is_stale(name: str, path: str) -> bool:
    """A staging entry is stale when its creator (same host, pid in the name) is gone, or, when that cannot be told
    (another host, an older name), once it is older than :data:`STALE_STAGING_SECONDS` (a day when the pid runs:
    it may have been reused)."""
    try:
        age = time.time() - os.lstat(path).st_mtime
    except OSError:
        return False
    match = re.search(r"(?:^\.(?:export|int8)-|\.)([0-9a-f]{8})-(\d+)[-.]", name)
    if match and match.group(1) == _staging_tag().split("-")[0]:
        pid = int(match.group(2))
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # it runs, as another user
            pass
        return age > 24 * STALE_STAGING_SECONDS
    return age > STALE_STAGING_SECONDS


def sweep_staging(folder: str) -> None:
    """Remove what interrupted exports left in ``folder``: ``.export-*`` / ``.int8-*`` staging folders and
    ``*.tmp`` files whose creating process is gone (or that are older than an hour)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith((".export-", ".int8-")) or name.endswith(".tmp")):
            continue
        path = os.path.join(folder, name)
        if not _staging_is_stale(name, path):
            continue
        logger.info("removing stale staging %s", path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _read_export_info(folder: str) -> dict:
    with open(os.path.join(folder, "export.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    if not isinstance(info, dict) or not isinstance(info.get("inputs"), list):
        raise ValueError("export.json has no input names")
    return info


def _unreadable(folder: str, error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"the cached export in {folder} was unreadable ({type(error).__name__}: {message[0] if message else ''})"


def export_onnx(model_path: str, *, masked_lm: bool = False, trust_remote_code: bool = False) -> str:
    """Export a model folder to ONNX (fp32), or return the cached export. Returns the ``.onnx`` path.

    A cached export whose ``export.json`` cannot be read is removed and made again (with a warning). Staging
    folders of interrupted exports (Ctrl-C, a killed process) are removed when their process is gone.
    """
    model_path = os.fspath(model_path)
    options = {"masked_lm": masked_lm, "trust_remote_code": trust_remote_code, "opset": 18}
    folder = os.path.join(cache_root(), "onnx", _fingerprint(model_path, options))
    target = os.path.join(folder, "model.onnx")
    broken = None
    if os.path.isfile(target):
        try:
            _read_export_info(folder)
            return target
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            broken = _unreadable(folder, error)
            shutil.rmtree(folder, ignore_errors=True)
    from transformers import AutoModel, AutoModelForMaskedLM

    from tembed.backends.torch_backend import _forward_parameters, quiet_transformers

    loader = AutoModelForMaskedLM if masked_lm else AutoModel
    with quiet_transformers():
        model = loader.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code, attn_implementation="eager"
        ).eval()
    encoder = model.base_model if masked_lm else model
    with_token_types = "token_type_ids" in _forward_parameters(encoder)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    example_ids = torch.full((2, 8), 5, dtype=torch.long)
    example_mask = torch.ones(2, 8, dtype=torch.long)
    example_mask[1, 6:] = 0
    example = (example_ids, example_mask) + ((torch.zeros_like(example_ids),) if with_token_types else ())
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2)
    outputs = ["last_hidden_state", "logits"] if masked_lm else ["last_hidden_state"]
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    sweep_staging(os.path.dirname(folder))
    staging = tempfile.mkdtemp(prefix=f".export-{_staging_tag()}-", dir=os.path.dirname(folder))
    exporter_log = logging.getLogger("torch.onnx")
    previous_level = exporter_log.level
    try:
        exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notices
        with warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _ExportWrapper(model, masked_lm, with_token_types),
                example,
                input_names=names,
                output_names=outputs,
                dynamic_shapes={
                    "input_ids": {0: batch, 1: seq},
                    "attention_mask": {0: batch, 1: seq},
                    "token_type_ids": {0: batch, 1: seq} if with_token_types else None,
                },
                opset_version=18,
                dynamo=True,
                verbose=False,
            )
            program.optimize()
            large = sum(p.numel() for p in model.parameters()) * 4 > 1_500_000_000  # protobuf's 2 GB limit
            program.save(os.path.join(staging, "model.onnx"), external_data=large)
        exporter_log.setLevel(previous_level)
        with open(os.path.join(staging, "export.json"), "w", encoding="utf-8") as handle:
            json.dump({"model_path": model_path, "inputs": names, "outputs": outputs, **options}, handle)
        with contextlib.suppress(OSError):  # OSError: another process exported it meanwhile
            os.replace(staging, folder)
    except Exception as error:
        raise RuntimeError(
            f"exporting {model_path} to ONNX failed ({type(error).__name__}: {error}); use backend='torch'"
        ) from error
    finally:  # also on KeyboardInterrupt: no staging folder is left behind
        exporter_log.setLevel(previous_level)
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s", model_path, target)
    if broken:
        warnings.warn(f"{broken}; rebuilt it", stacklevel=2)
    return target


def _derived(onnx_path: str, name: str, build: Callable[[str, str], None]) -> str:
    """A file derived from the export (e.g. int8 weights), built once next to it."""
    target = os.path.join(os.path.dirname(onnx_path), name)
    if not os.path.isfile(target):
        sweep_staging(os.path.dirname(onnx_path))
        staging = f"{target}.{_staging_tag()}.tmp"
        try:
            build(onnx_path, staging)
            os.replace(staging, target)
        finally:  # also on KeyboardInterrupt
            with contextlib.suppress(OSError):
                os.remove(staging)
    return target


def _quantize_int8(source: str, target: str) -> None:
    """ORT dynamic int8 (per-channel weights), the first FFN down-projection kept fp32 (see backends/quantize.py)."""
    from tembed.backends.quantize import quantize_dynamic_int8

    quantize_dynamic_int8(source, target, keep_fp32="first_down")


def _openvino_int8(
    onnx_path: str, model_path: str, input_names: list[str], trust_remote_code: bool, recipe: str | None = None
) -> str:
    """NNCF static int8 IR of the export, built once next to it; returns the ``.xml``.

    ``recipe`` is a :data:`tembed.backends.quantize.OPENVINO_INT8_RECIPES` name, by default the one for this CPU
    (VNNI or not); the file name carries it (``int8-ov-v2-vnni.xml``, ``int8-ov-v2-no-vnni.xml``), so a cache shared
    by different CPUs keeps one IR per recipe.
    """
    from tembed.backends.quantize import (
        OPENVINO_INT8_RECIPES,
        openvino_int8_recipe,
        tokenized_calibration,
        write_openvino_int8,
    )

    recipe = recipe or openvino_int8_recipe()
    folder = os.path.dirname(onnx_path)
    target = os.path.join(folder, f"int8-ov-v2-{recipe}.xml")
    if not os.path.isfile(target):
        sweep_staging(folder)
        feeds = []
        if not OPENVINO_INT8_RECIPES[recipe].get("weights_only"):
            feeds = tokenized_calibration(model_path, input_names, trust_remote_code=trust_remote_code)
        staging = tempfile.mkdtemp(prefix=f".int8-{_staging_tag()}-", dir=folder)
        try:
            write_openvino_int8(onnx_path, os.path.join(staging, "model.xml"), feeds, **OPENVINO_INT8_RECIPES[recipe])
            os.replace(os.path.join(staging, "model.bin"), target[: -len(".xml")] + ".bin")
            os.replace(os.path.join(staging, "model.xml"), target)  # the .xml last: it marks the IR complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _compiled_precision(compiled: Any, precision: str) -> str:
    """The precision an OpenVINO compiled model runs in: its inference precision, read back after compiling
    (``"int8"`` stays ``"int8"``; its unquantized ops follow the hint)."""
    if precision == "int8":
        return precision
    try:
        name = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # an OpenVINO without this property: trust the hint
        return precision
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(name, precision)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _feed(batch: TokenBatch, input_names: list[str]) -> dict[str, np.ndarray]:
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if "token_type_ids" in input_names:
        feed["token_type_ids"] = (
            batch.token_type_ids if batch.token_type_ids is not None else np.zeros_like(batch.input_ids)
        )
    return feed


# Extra graph outputs of the OpenVINO model: pooling method -> output name.
POOLED_OUTPUTS = {"mean": "pooled_mean", "cls": "pooled_cls"}


def _with_pooled_outputs(model: object) -> object:
    """An OpenVINO model with two more outputs after ``last_hidden_state``: ``pooled_mean`` (masked mean over the
    real tokens, as :func:`tembed.heads.pool`) and ``pooled_cls`` (the first token), both (batch, hidden) f32."""
    import openvino.opset13 as ops

    hidden = model.output("last_hidden_state").get_node().input_value(0)  # type: ignore[attr-defined]
    mask = next(p for p in model.get_parameters() if p.get_friendly_name() == "attention_mask")  # type: ignore[attr-defined]
    axis = ops.constant(np.array([1], dtype=np.int64))
    weights = ops.convert(ops.unsqueeze(mask, ops.constant(np.array([-1], dtype=np.int64))), "f32")
    total = ops.reduce_sum(ops.multiply(hidden, weights), axis, keep_dims=False)
    count = ops.maximum(ops.reduce_sum(weights, axis, keep_dims=False), ops.constant(np.float32(1e-9)))
    pooled = {
        "mean": ops.divide(total, count),
        "cls": ops.gather(hidden, ops.constant(np.int64(0)), ops.constant(np.int64(1))),
    }
    results = []
    for method, node in pooled.items():
        result = ops.result(node)
        result.output(0).set_names({POOLED_OUTPUTS[method]})
        results.append(result)
    model.add_results(results)  # type: ignore[attr-defined]
    return model


def _optimal_requests(compiled: Any) -> int:
    """How many infer requests the compiled model runs at once (its streams); 1 if it does not say."""
    try:
        return int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    except Exception:
        return 1


class _OnnxBackendBase:
    device = torch.device("cpu")

    def __init__(self, path: str, *, masked_lm: bool, trust_remote_code: bool) -> None:
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.hidden_size = int(self.config.hidden_size)
        self.masked_lm = masked_lm
        self._export_args = (path, masked_lm, trust_remote_code)
        self._export()

    def _export(self) -> None:
        path, masked_lm, trust_remote_code = self._export_args
        self.onnx_path = export_onnx(path, masked_lm=masked_lm, trust_remote_code=trust_remote_code)
        self.input_names: list[str] = _read_export_info(os.path.dirname(self.onnx_path))["inputs"]

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
            broken = _unreadable(folder, error)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            self._export()
            loaded = open_export(self.onnx_path)
        except Exception as error:
            raise RuntimeError(f"{broken}; rebuilding it failed too ({type(error).__name__}: {error})") from error
        warnings.warn(f"{broken}; rebuilt it", stacklevel=4)
        return loaded

    def _check(self, want_logits: bool) -> None:
        if want_logits and not self.masked_lm:
            raise ValueError("this model was loaded without a masked-LM head: no vocabulary logits")

    @staticmethod
    def _output(arrays: list[np.ndarray], want_logits: bool) -> BackendOutput:
        hidden = torch.from_numpy(np.ascontiguousarray(arrays[0], dtype=np.float32))
        logits = torch.from_numpy(np.ascontiguousarray(arrays[1], dtype=np.float32)) if want_logits else None
        return BackendOutput(hidden=hidden, logits=logits)


class OnnxRuntimeBackend(_OnnxBackendBase):
    """ONNX Runtime on the CPU.

    Args:
        path: the model folder (exported on first use, then cached).
        precision: ``"fp32"`` (same vectors as torch within float round-off) or ``"int8"`` (dynamic
            quantization with per-channel int8 weights: about 2-3x faster, cosine about 0.99 to fp32).
        masked_lm: export the masked-LM logits too (SPLADE).
        trust_remote_code: allow the checkpoint's own code during export.
    """

    def __init__(
        self, path: str, *, precision: str = "fp32", masked_lm: bool = False, trust_remote_code: bool = False
    ) -> None:
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise ValueError(f"backend='onnx' supports precision fp32 or int8, got {precision!r}")
        super().__init__(path, masked_lm=masked_lm, trust_remote_code=trust_remote_code)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3

        def open_export(onnx_path: str) -> object:
            model_file = onnx_path if precision == "fp32" else _derived(onnx_path, "int8-v2.onnx", _quantize_int8)
            return ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])

        self.session: object | None = self._load(open_export)
        self.precision = self.effective_precision = precision

    def forward(self, batch: TokenBatch, *, want_logits: bool = False, pooling: str | None = None) -> BackendOutput:
        """The last hidden state (and logits for masked-LM exports) as CPU float32 tensors (``pooling`` is
        ignored: the pipeline pools)."""
        if self.session is None:
            raise RuntimeError("this backend is closed")
        self._check(want_logits)
        names = ["last_hidden_state", "logits"] if want_logits else ["last_hidden_state"]
        return self._output(self.session.run(names, _feed(batch, self.input_names)), want_logits)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.session = None


class OpenVinoBackend(_OnnxBackendBase):
    """OpenVINO on the CPU, reading the same ONNX export.

    Args:
        path: the model folder.
        precision: ``"fp32"`` (f32 inference hint: faithful) or ``"bf16"`` (bf16 hint: about 2x faster on CPUs
            with AVX512-BF16 or AMX, cosine >= 0.9999 to fp32) or ``"int8"`` (NNCF static int8 with the packaged
            calibration text, built once and cached; needs nncf; about 4x sentence-transformers on 2 Zen 4 cores).
        masked_lm: export the masked-LM logits too (SPLADE).
        trust_remote_code: allow the checkpoint's own code during export.
    """

    def __init__(
        self, path: str, *, precision: str = "fp32", masked_lm: bool = False, trust_remote_code: bool = False
    ) -> None:
        import openvino as ov

        hints = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}  # int8: the unquantized ops run in bf16
        if precision not in hints:
            raise ValueError(f"backend='openvino' supports precision fp32, bf16 or int8, got {precision!r}")
        super().__init__(path, masked_lm=masked_lm, trust_remote_code=trust_remote_code)
        core = ov.Core()
        if precision == "int8" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            hints["int8"] = "f32"
        self.int8_recipe: str | None = None
        if precision == "int8":
            from tembed.backends.quantize import openvino_int8_recipe

            self.int8_recipe = openvino_int8_recipe()
        config = {
            "INFERENCE_NUM_THREADS": _threads(),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # Several worker processes each run their own OpenVINO: pinned threads would all land on the
            # first cores. Leave placement to the OS.
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": hints[precision],
        }

        def open_export(onnx_path: str) -> object:
            model_file = onnx_path
            if precision == "int8":
                model_file = _openvino_int8(onnx_path, path, self.input_names, trust_remote_code, self.int8_recipe)
            return core.compile_model(_with_pooled_outputs(core.read_model(model_file)), "CPU", config)

        self.compiled: object | None = self._load(open_export)
        # What the compiled model really runs in: OpenVINO ignores the bf16 hint on CPUs without AVX512-BF16/AMX.
        self.effective_precision = _compiled_precision(self.compiled, precision)
        if self.effective_precision != precision:
            warnings.warn(
                f"precision={precision!r}: this CPU has no native {precision} (AVX512-BF16 or AMX), so OpenVINO runs "
                f"{self.effective_precision} (the same vectors as fp32, without the speed-up)",
                stacklevel=4,
            )
        # An infer request holds its inputs and outputs, so it serves one call at a time. The compiled model runs
        # OPTIMAL_NUMBER_OF_INFER_REQUESTS requests at once (one per stream: 1 with the latency hint, whose one
        # request already uses every core); each forward takes an idle request, waiting while all are busy, and
        # gives it back after copying the outputs out. Concurrent callers never share a request, and never run
        # more inferences than there are streams (more only fight over the cores: benchmarks/concurrency.py).
        self._idle_requests: queue.Queue = queue.Queue()
        for _ in range(max(1, _optimal_requests(self.compiled))):
            self._idle_requests.put(self.compiled.create_infer_request())  # type: ignore[attr-defined]
        self.precision = precision

    @contextlib.contextmanager
    def _request(self) -> Iterator[Any]:
        """An infer request this thread has to itself until the block ends (waits for one to be idle)."""
        if self.compiled is None:
            raise RuntimeError("this backend is closed")
        request = self._idle_requests.get()
        try:
            yield request
        finally:
            self._idle_requests.put(request)

    def forward(self, batch: TokenBatch, *, want_logits: bool = False, pooling: str | None = None) -> BackendOutput:
        """The last hidden state (and logits for masked-LM exports) as CPU float32 tensors.

        With ``pooling="mean"`` or ``"cls"`` (and no logits), only the vectors pooled inside the graph are copied
        out, as ``pooled`` (batch, hidden) float32: 3-5% faster than copying the hidden state and pooling it.
        """
        self._check(want_logits)
        pooled = pooling in POOLED_OUTPUTS and not want_logits
        if pooled:
            names = [POOLED_OUTPUTS[pooling]]  # type: ignore[index]
        else:
            names = ["last_hidden_state", "logits"] if want_logits else ["last_hidden_state"]
        with self._request() as request:
            result = request.infer(_feed(batch, self.input_names))
            # The outputs live in the request's buffers, which the next call overwrites: copy before giving it back.
            arrays = [np.array(result[name], copy=True) for name in names]
        if pooled:
            return BackendOutput(hidden=None, pooled=torch.from_numpy(arrays[0]))
        return self._output(arrays, want_logits)

    def close(self) -> None:
        self.compiled = None  # requests in use finish their call; later calls are refused
