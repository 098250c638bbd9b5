"""OpenVINO and NNCF usage telemetry, off unless the user opted in."""

from __future__ import annotations

import os
import sys


def _telemetry_opted_in() -> bool:
    """Whether this user opted in to OpenVINO telemetry (``opt_in_out --opt_in`` writes ``1`` to the consent file
    ``~/intel/openvino_telemetry``; on Windows ``%LOCALAPPDATA%/Intel Corporation/openvino_telemetry``)."""
    if sys.platform == "win32":
        consent = os.path.join(os.environ.get("LOCALAPPDATA", ""), "Intel Corporation", "openvino_telemetry")
    else:
        consent = os.path.join(os.path.expanduser("~"), "intel", "openvino_telemetry")
    try:
        with open(consent, encoding="utf-8") as handle:
            return handle.readline().strip() == "1"
    except OSError:
        return False


def disable_openvino_telemetry() -> None:
    """Keep OpenVINO and NNCF from sending usage telemetry, unless the user opted in.

    ``import openvino`` initializes the ``openvino_telemetry`` package, which (without a consent file) writes a
    client ID under ``~/intel`` and sends an "import" event to Google Analytics; NNCF does the same when imported.
    Both fall back to a no-op stub when ``openvino_telemetry`` cannot be imported, so this makes it unimportable in
    this process (``sys.modules`` entry ``None``) before tembed imports either: nothing is written and nothing
    is sent, and the user's machine-wide setting is left alone. A user who opted in (``opt_in_out --opt_in``)
    keeps telemetry. Called before every ``import openvino`` / ``import nncf`` in tembed; a no-op if
    ``openvino_telemetry`` was already imported by someone else.
    """
    if "openvino_telemetry" in sys.modules or _telemetry_opted_in():
        return
    # A None entry makes the import raise ImportError, so both fall back to their stubs (typeshed types sys.modules
    # without the None entries the import system honours).
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
