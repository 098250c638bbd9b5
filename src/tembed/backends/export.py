"""The ONNX export of a model folder and its cache, shared by the ONNX Runtime and OpenVINO backends.

The model is exported once with ``torch.onnx.export`` (dynamic batch and sequence axes; the exporter based on
``torch.export``, which traces transformers 5's attention masks correctly) and cached under ``$TEMBED_CACHE``
(default ``~/.cache/tembed``), keyed by the content of the model's files and the export options (see
:func:`fingerprint`), so a second load does not re-export, nor does a copy of the folder. Files derived from the
export (int8 weights for ONNX Runtime, int8 OpenVINO IRs) are cached beside it.

Every write goes through a staging folder or file named after this process (:func:`staging_tag`), renamed into
place when complete; what interrupted builds leave is swept (:func:`sweep_staging`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from tembed.backends.torch_backend import forward_parameters, quiet_transformers

logger = logging.getLogger(__name__)

EXPORT_VERSION = 2  # bump when the export recipe or the cache key changes (2: keyed by the files' content)
OPSET = 18
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")
STALE_STAGING_SECONDS = 3600  # staging left by another machine (or a reused pid) is swept after this long
ONNXRUNTIME_INT8_FILE = "int8-v3.onnx"  # v3: quantized after ONNX Runtime's fusions
_HASH_CHUNK = 1 << 20


def cache_root() -> str:
    """Where exports are cached: ``$TEMBED_CACHE`` or ``~/.cache/tembed``."""
    return os.environ.get("TEMBED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tembed")


# ------------------------------------------------------------------------------------------------- the cache key
@functools.lru_cache(maxsize=4096)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """The sha256 of a file's bytes. Memoized by (path, size, mtime): each file is read at most once per process,
    however many models are loaded from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """The sha256 of the file at ``path`` (memoized per process while its size and mtime stay the same)."""
    path = os.path.abspath(path)
    stat = os.stat(path)
    return _content_digest(path, stat.st_size, stat.st_mtime_ns)


def fingerprint(model_path: str, options: dict) -> str:
    """The cache key of an export: the content of the model folder's weight, config and tokenizer files (names and
    bytes, not mtimes, so a copied folder or a rebuilt identical model hits the cache), the export options, and the
    export recipe's, torch's and transformers' versions. Only the top folder counts: it holds all that
    ``from_pretrained`` reads."""
    import transformers

    digest = hashlib.sha256()
    versions = {"export": EXPORT_VERSION, "torch": torch.__version__, "transformers": transformers.__version__}
    digest.update(json.dumps({**options, **versions}, sort_keys=True).encode())
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if not os.path.isfile(path) or not name.endswith(FINGERPRINT_SUFFIXES):
            continue
        digest.update(f"{name}:{file_digest(path)}\n".encode())
    return digest.hexdigest()[:24]


# ------------------------------------------------------------------------------------------------------ staging
def staging_tag() -> str:
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
    if match and match.group(1) == staging_tag().split("-")[0]:
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


# ------------------------------------------------------------------------------------------------------- export
def read_export_info(folder: str) -> dict:
    """The export's ``export.json`` (input and output names, options); ValueError or OSError when unreadable."""
    with open(os.path.join(folder, "export.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    if not isinstance(info, dict) or not isinstance(info.get("inputs"), list):
        raise ValueError("export.json has no input names")
    return info


def describe_unreadable(folder: str, error: BaseException) -> str:
    """The first half of the warning (or error) about an unreadable cached export."""
    message = str(error).strip().splitlines()
    return f"the cached export in {folder} was unreadable ({type(error).__name__}: {message[0] if message else ''})"


class _ExportWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, masked_lm: bool, with_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.masked_lm = masked_lm
        self.with_token_types = with_token_types

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        kwargs: dict[str, torch.Tensor | None] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.masked_lm:
            output = self.model(**kwargs, output_hidden_states=True, return_dict=True)
            return output.hidden_states[-1], output.logits
        return self.model(**kwargs, return_dict=True).last_hidden_state


def _load_for_export(model_path: str, masked_lm: bool, trust_remote_code: bool) -> tuple[torch.nn.Module, bool]:
    """The model in fp32 with eager attention, and whether its encoder takes ``token_type_ids``."""
    from transformers import AutoModel, AutoModelForMaskedLM

    loader = AutoModelForMaskedLM if masked_lm else AutoModel
    with quiet_transformers():
        model = loader.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code, attn_implementation="eager"
        ).eval()
    encoder = model.base_model if masked_lm else model
    return model, "token_type_ids" in forward_parameters(encoder)


def _write_onnx(model: torch.nn.Module, target: str, names: list[str], outputs: list[str], masked_lm: bool) -> None:
    """``torch.onnx.export`` of ``model`` to ``target`` (dynamic batch and sequence axes), exporter notices off."""
    with_token_types = "token_type_ids" in names
    example_ids = torch.full((2, 8), 5, dtype=torch.long)
    example_mask = torch.ones(2, 8, dtype=torch.long)
    example_mask[1, 6:] = 0
    example = (example_ids, example_mask) + ((torch.zeros_like(example_ids),) if with_token_types else ())
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2)
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
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
            if program is None:  # only the TorchScript exporter (dynamo=False) returns None
                raise RuntimeError("torch.onnx.export returned no program")
            program.optimize()
            large = sum(p.numel() for p in model.parameters()) * 4 > 1_500_000_000  # protobuf's 2 GB limit
            program.save(target, external_data=large)
    finally:
        exporter_log.setLevel(previous_level)


def export_onnx(model_path: str, *, masked_lm: bool = False, trust_remote_code: bool = False) -> str:
    """Export a model folder to ONNX (fp32), or return the cached export. Returns the ``.onnx`` path.

    A cached export whose ``export.json`` cannot be read is removed and made again (with a warning). Staging
    folders of interrupted exports (Ctrl-C, a killed process) are removed when their process is gone.
    """
    model_path = os.fspath(model_path)
    options = {"masked_lm": masked_lm, "trust_remote_code": trust_remote_code, "opset": OPSET}
    folder = os.path.join(cache_root(), "onnx", fingerprint(model_path, options))
    target = os.path.join(folder, "model.onnx")
    broken = None
    if os.path.isfile(target):
        try:
            read_export_info(folder)
            return target
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            broken = describe_unreadable(folder, error)
            shutil.rmtree(folder, ignore_errors=True)
    model, with_token_types = _load_for_export(model_path, masked_lm, trust_remote_code)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    outputs = ["last_hidden_state", "logits"] if masked_lm else ["last_hidden_state"]
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    sweep_staging(os.path.dirname(folder))
    staging = tempfile.mkdtemp(prefix=f".export-{staging_tag()}-", dir=os.path.dirname(folder))
    try:
        _write_onnx(model, os.path.join(staging, "model.onnx"), names, outputs, masked_lm)
        with open(os.path.join(staging, "export.json"), "w", encoding="utf-8") as handle:
            json.dump({"model_path": model_path, "inputs": names, "outputs": outputs, **options}, handle)
        with contextlib.suppress(OSError):  # OSError: another process exported it meanwhile
            os.replace(staging, folder)
    except Exception as error:
        raise RuntimeError(
            f"exporting {model_path} to ONNX failed ({type(error).__name__}: {error}); use backend='torch'"
        ) from error
    finally:  # also on KeyboardInterrupt: no staging folder is left behind
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s", model_path, target)
    if broken:
        warnings.warn(f"{broken}; rebuilt it", stacklevel=2)
    return target


# -------------------------------------------------------------------------------------------------- derived files
def derived_file(onnx_path: str, name: str, build: Callable[[str, str], None]) -> str:
    """A file derived from the export (e.g. int8 weights), built once next to it by ``build(onnx_path, staging)``."""
    target = os.path.join(os.path.dirname(onnx_path), name)
    if not os.path.isfile(target):
        sweep_staging(os.path.dirname(onnx_path))
        staging = f"{target}.{staging_tag()}.tmp"
        try:
            build(onnx_path, staging)
            os.replace(staging, target)
        finally:  # also on KeyboardInterrupt
            with contextlib.suppress(OSError):
                os.remove(staging)
    return target


def _onnxruntime_dynamic_int8(source: str, target: str) -> None:
    """ORT dynamic int8 (per-channel weights) of the fused export, the first FFN down-projection kept fp32 (see
    backends/quantize.py)."""
    from tembed.backends.quantize import fuse_for_onnxruntime, quantize_dynamic_int8

    fused = f"{target}.fused.tmp"  # a staging name: swept if this process dies
    try:
        quantize_dynamic_int8(fused if fuse_for_onnxruntime(source, fused) else source, target, keep_fp32="first_down")
    finally:
        with contextlib.suppress(OSError):
            os.remove(fused)


def onnxruntime_int8(onnx_path: str) -> str:
    """The ONNX Runtime dynamic int8 model of the export, built once next to it; returns its path."""
    return derived_file(onnx_path, ONNXRUNTIME_INT8_FILE, _onnxruntime_dynamic_int8)


def openvino_int8(
    onnx_path: str, model_path: str, input_names: list[str], trust_remote_code: bool, recipe: str | None = None
) -> str:
    """The NNCF int8 IR of the export, built once next to it; returns the ``.xml``.

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
        staging = tempfile.mkdtemp(prefix=f".int8-{staging_tag()}-", dir=folder)
        try:
            write_openvino_int8(onnx_path, os.path.join(staging, "model.xml"), feeds, **OPENVINO_INT8_RECIPES[recipe])
            os.replace(os.path.join(staging, "model.bin"), target[: -len(".xml")] + ".bin")
            os.replace(os.path.join(staging, "model.xml"), target)  # the .xml last: it marks the IR complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
