"""Checks of a model folder before anything is loaded from it, each naming the folder or file at fault.

* :func:`read_json_file`: a JSON file, with the file named when it is not valid JSON;
* :func:`check_remote_code`: a checkpoint that ships its own model code (``auto_map``) is refused unless the code
  is trusted (or, for a model type transformers knows, the user explicitly chose its built-in class);
* :func:`check_tokenizer_files`: the folder has tokenizer files (never encode with an empty vocabulary);
* :func:`check_tokenizer_size`: the tokenizer is not far smaller than the model's vocabulary;
* :func:`check_safetensors`: every ``*.safetensors`` file is complete (a truncated download fails here, named).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any


class ModelFilesError(ValueError):
    """A model folder's files are missing, corrupt or do not belong together."""


# A fast or slow tokenizer needs one of these (tokenizer_config.json alone holds no vocabulary).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "spm.model",
    "sentencepiece.model",
)


def read_json_file(path: str) -> Any:
    """The parsed JSON of ``path``; ModelFilesError naming the file (and line) when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ModelFilesError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except UnicodeDecodeError as error:
        raise ModelFilesError(f"{path} is not valid UTF-8 text (byte {error.start})") from None


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def check_model_folder(folder: str, *, trust_remote_code: bool, explicit: bool = False) -> None:
    """The checks to run before loading anything from ``folder``: remote code (see :func:`check_remote_code`),
    tokenizer files, safetensors."""
    check_remote_code(folder, trusted=trust_remote_code, explicit=explicit)
    check_tokenizer_files(folder)
    check_safetensors(folder)


_MODEL_LOADERS = ("AutoModel", "AutoModelForMaskedLM")


def check_remote_code(folder: str, *, trusted: bool, explicit: bool = False) -> None:
    """Refuse a checkpoint that ships its own model code unless ``trusted`` (the user's ``trust_remote_code=True``,
    or the registry vouching for the exact hub id).

    A checkpoint whose ``config.json`` ``auto_map`` names code for its model is refused when transformers does not
    know its ``model_type`` (only that code can load it), and also when it does (gte-Qwen2 is a ``qwen2`` with its
    own attention) unless the user said ``trust_remote_code=False`` explicitly (``explicit``): loading the built-in
    class quietly would give other vectors than the checkpoint's code.

    Raises:
        ModelFilesError: naming the folder and the code it would run.
    """
    if trusted:
        return
    config = read_json_file(os.path.join(folder, "config.json"))
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict) or not auto_map:
        return
    known = config.get("model_type") in _known_model_types()
    if known and (explicit or not any(loader in auto_map for loader in _MODEL_LOADERS)):
        return
    modules = sorted({str(target).split("--")[-1].split(".")[0] + ".py" for target in auto_map.values()})
    message = (
        f"the model in {folder} ships its own Python code ({', '.join(modules)}, listed in config.json's auto_map), "
        "which tembed runs only with trust_remote_code=True (--trust-remote-code on the command line): pass it if "
        "you trust this checkpoint (the registry vouches only for the exact hub ids it lists)"
    )
    if known:
        message += (
            f", or trust_remote_code=False to load it with transformers' built-in {config['model_type']!r} class "
            "instead (its vectors may differ from what the checkpoint's code computes)"
        )
    raise ModelFilesError(message)


def check_tokenizer_files(folder: str) -> None:
    """Raise ModelFilesError when ``folder`` holds none of :data:`TOKENIZER_FILES`."""
    names = os.listdir(folder)
    # tokenizer_config.json alone may describe a tokenizer without a vocabulary file (ByT5, CANINE) or a tiktoken
    # one: check_tokenizer_size then catches one that loads nearly empty.
    if not any(
        name in TOKENIZER_FILES or name == "tokenizer_config.json" or name.endswith(".tiktoken") for name in names
    ):
        raise ModelFilesError(
            f"the model folder {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy the "
            "tokenizer files of the checkpoint into it"
        )


def check_tokenizer_size(folder: str, tokenizer_size: int, vocab_size: int | None) -> None:
    """Refuse a tokenizer far smaller than the model's vocabulary (less than half): its files belong to another
    model, or are incomplete. Models pad their vocabulary a little (Qwen: 151,936 rows for 151,665 tokens), so
    only a large gap is an error."""
    if vocab_size and tokenizer_size < vocab_size // 2:
        present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))]
        raise ModelFilesError(
            f"the tokenizer in {folder} ({', '.join(present) or 'no tokenizer files'}) has {tokenizer_size:,} tokens "
            f"but the model's vocabulary has {vocab_size:,}: the tokenizer files are incomplete or belong to another "
            "model"
        )


def check_safetensors(folder: str) -> None:
    """Raise ModelFilesError naming a ``*.safetensors`` file whose header is unreadable or whose data is cut short.

    Reads only each file's header (8 bytes of length, then JSON), so it costs nothing next to loading.
    """
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as handle:
                (header_length,) = struct.unpack("<Q", handle.read(8))
                if header_length > size - 8:
                    raise ValueError(f"its header claims {header_length:,} bytes")
                header = json.loads(handle.read(header_length))
            end = max(
                (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0
            )
        except OSError as error:  # e.g. a hub-cache link whose blob is missing
            raise ModelFilesError(f"{path} cannot be read ({error.strerror or error})") from None
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as error:
            raise ModelFilesError(
                f"{path} is not a readable safetensors file ({error or type(error).__name__}): the file is corrupt "
                "or was not fully downloaded"
            ) from None
        if 8 + header_length + end > size:
            raise ModelFilesError(
                f"{path} is truncated: {size:,} bytes, its header needs {8 + header_length + end:,}; the file was "
                "not fully downloaded or copied"
            )
