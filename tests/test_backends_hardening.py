"""The CPU backends on real machines: telemetry off, the precision really used, the int8 recipe per instruction set,
unreadable cached exports rebuilt, no staging left behind by interrupted exports, the export cache keyed by the
model files' content, and no heavy import for code that only names backends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tembed import Embedder
from tembed.backends import export

pytest.importorskip("onnxruntime")

UNREADABLE = r"the cached export in .+ was unreadable \(.+\); rebuilt it"


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory, minilm_path):
    """An export cache holding MiniLM's export alone (tests copy it, never change it). The export is the session's
    (``$TEMBED_CACHE``): made there at most once, so every later test that loads MiniLM on a CPU backend reuses it;
    its folder is copied here without the files derived from it (int8 builds other tests may have added)."""
    source = os.path.dirname(export.export_onnx(minilm_path))
    folder = str(tmp_path_factory.mktemp("pristine-cache"))
    shutil.copytree(
        source,
        os.path.join(folder, "onnx", os.path.basename(source)),
        ignore=shutil.ignore_patterns("int8*", ".*", "*.tmp"),
    )
    return folder


@pytest.fixture
def cache(pristine_cache, tmp_path, monkeypatch):
    """A private copy of the pristine cache as ``$TEMBED_CACHE``; returns the export folder in it."""
    root = str(tmp_path / "cache")
    shutil.copytree(pristine_cache, root)
    monkeypatch.setenv("TEMBED_CACHE", root)
    (name,) = os.listdir(os.path.join(root, "onnx"))
    return os.path.join(root, "onnx", name)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = str(tmp_path / "empty-cache")
    monkeypatch.setenv("TEMBED_CACHE", root)
    return root


def _count_exports(monkeypatch) -> list[int]:
    import torch

    calls = []
    original = torch.onnx.export

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting)
    return calls


def _garble(path: str) -> None:
    """Keep the file's size, overwrite its first KiB: a torn or bit-rotted file that no loader accepts."""
    with open(path, "r+b") as handle:
        handle.write(b"\x07garbage\xff" * 128)


def _truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 3)


# ------------------------------------------------------------------------------------------- item 9: telemetry
_TELEMETRY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sockets = []
    sys.addaudithook(lambda event, args: sockets.append(event) if event.startswith("socket.") else None)
    from tembed import Embedder
    with Embedder(sys.argv[1], device="cpu", backend="openvino", precision="fp32") as embedder:
        embedder.encode(["no telemetry, please"])
    import nncf  # noqa: F401  (int8 calibration imports it: its telemetry must be off too)
    import openvino.tools.ovc.telemetry_utils as ovc_telemetry
    import nncf.telemetry.wrapper as nncf_telemetry
    print(json.dumps({
        "module": repr(sys.modules.get("openvino_telemetry", "absent")),
        "ovc": ovc_telemetry.tm.__name__,
        "nncf": type(nncf_telemetry.telemetry).__name__,
        "sockets": sorted(set(sockets)),
    }))
    """
)


def _clean_env(home: str) -> dict[str, str]:
    env = dict(os.environ, HOME=home, USERPROFILE=home)
    for name in ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV"):  # the package's own CI opt-outs
        env.pop(name, None)
    return env


def test_openvino_telemetry_is_off_by_default(cache, minilm_path, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _TELEMETRY_SCRIPT, minilm_path],
        env=_clean_env(str(home)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if "intel" in p.parts)
    assert written == []  # no consent file, no client ID, no stats file under ~/intel
    assert report["module"] == "None"  # openvino_telemetry is not loaded in this process
    assert report["ovc"] == "openvino.tools.ovc.telemetry_stub"  # `import openvino`'s "import" event: the stub
    assert report["nncf"] == "MagicMock"  # NNCF's own stub
    assert report["sockets"] == []  # nothing left this process


def test_an_explicit_telemetry_opt_in_is_respected(tmp_path):
    home = tmp_path / "home"
    (home / "intel").mkdir(parents=True)
    (home / "intel" / "openvino_telemetry").write_text("1")
    script = "import sys; import tembed.backends.openvino; print(sys.modules.get('openvino_telemetry', 'absent'))"
    result = subprocess.run(
        [sys.executable, "-c", script], env=_clean_env(str(home)), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "absent"  # not blocked: openvino may load it as the user chose


# ------------------------------------------------------------------------------ item 13: the precision really used
def test_bf16_without_native_bf16_says_it_runs_fp32(cache, minilm_path):
    openvino = pytest.importorskip("openvino")
    native = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with Embedder(minilm_path, device="cpu", backend="openvino", precision="fp32") as fp32:
        assert fp32.effective_precision == fp32.backend.effective_precision == "fp32"
        expected = fp32.encode(["a sentence", "another one"])
    if native:
        with Embedder(minilm_path, device="cpu", backend="openvino", precision="bf16") as bf16:
            assert bf16.effective_precision == "bf16"
        return
    with pytest.warns(UserWarning, match=r"precision='bf16'.*no native bf16.*runs fp32"):
        bf16 = Embedder(minilm_path, device="cpu", backend="openvino", precision="bf16")
    with bf16:
        assert bf16.precision == "bf16"  # as asked
        assert bf16.effective_precision == bf16.backend.effective_precision == "fp32"
        assert "precision='bf16', effective_precision='fp32'" in repr(bf16)
        assert bf16.settings()["effective_precision"] == "fp32"
        np.testing.assert_array_equal(bf16.encode(["a sentence", "another one"]), expected)


def test_info_reports_the_effective_precision(cache, minilm_path):
    from typer.testing import CliRunner

    from tembed import cli

    result = CliRunner().invoke(cli.app, ["info", minilm_path], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{") :])
    assert info["precision"] == "auto"
    assert info["effective_precision"] == "fp32"


def test_torch_reports_its_dtype(minilm_path):
    with Embedder(minilm_path, device="cpu", backend="torch", precision="bf16") as e:
        assert e.effective_precision == "bf16"  # torch really computes in bf16 (emulated where not native)
    with Embedder(minilm_path, device="cpu", backend="torch") as e:
        assert e.effective_precision == "fp32"


# ------------------------------------------------------------------------------ item 13: the int8 recipe per CPU
def test_int8_recipe_follows_the_instruction_set(tmp_path):
    from tembed.backends.cpu import cpu_flags, cpu_model, describe_cpu, instruction_set, int8_engine
    from tembed.backends.quantize import OPENVINO_INT8_RECIPES, openvino_int8_recipe

    for flags, recipe, engine, isa in [
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "vnni", "openvino", "avx512-vnni"),  # Zen 4, Ice Lake+
        ({"avx2", "avx_vnni"}, "vnni", "openvino", "avx-vnni"),  # Alder Lake and later clients
        ({"avx2", "avx512f", "avx512_vnni", "amx_int8"}, "vnni", "openvino", "amx"),  # Sapphire Rapids
        ({"avx2", "fma"}, "no-vnni", "onnx", "avx2"),  # Zen 2/3, Haswell to Comet Lake
        ({"avx2", "avx512f", "avx512bw"}, "no-vnni", "onnx", "avx512"),  # Skylake-X: AVX-512 but no VNNI
        (set(), "no-vnni", "onnx", "baseline"),  # unknown
    ]:
        assert openvino_int8_recipe(frozenset(flags)) == recipe, flags
        assert int8_engine(frozenset(flags)) == engine, flags
        assert instruction_set(frozenset(flags)) == isa, flags
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse avx2 avx512_vnni\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpu_flags(str(cpuinfo)) == {"fpu", "sse", "avx2", "avx512_vnni"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert cpu_model(str(cpuinfo)) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model(str(tmp_path / "missing"))  # platform's answer, never empty
    assert describe_cpu(frozenset({"avx2", "fma"}), "Zen 3") == (
        "Zen 3 [avx2]: avx2 fma -avx512f -avx512_vnni -avx_vnni -avx512_bf16 -amx_bf16 -amx_int8"
    )
    # The VNNI recipe is the one measured on Zen 4 (docs/cpu-performance.md); without VNNI, int8 weights only.
    assert OPENVINO_INT8_RECIPES["vnni"] == {"keep_fp32": "first_down", "preset": "mixed"}
    assert OPENVINO_INT8_RECIPES["no-vnni"] == {"weights_only": True}


def test_int8_engine_follows_the_cpu_not_the_installed_packages(monkeypatch):
    """precision="int8" picks OpenVINO static int8 with VNNI and ONNX Runtime dynamic int8 without (where OpenVINO
    int8 is slower than fp32), whatever optional packages are installed."""
    import torch

    from tembed.backends import cpu, select

    device = torch.device("cpu")
    for installed in (True, False):
        monkeypatch.setattr(select, "_installed", lambda module, answer=installed: answer)
        monkeypatch.setattr(cpu, "cpu_flags", lambda path=cpu.CPUINFO: frozenset({"avx2", "fma"}))
        assert select.choose_backend("auto", "int8", device, "bert") == "onnx"
        monkeypatch.setattr(cpu, "cpu_flags", lambda path=cpu.CPUINFO: frozenset({"avx2", "avx512_vnni"}))
        assert select.choose_backend("auto", "int8", device, "bert") == "openvino"
        assert select.choose_backend("auto", "int8", device, "llama") == "onnx"  # export untested: no NNCF recipe
        assert select.choose_backend("auto", "fp32", device, "bert") == "openvino"


def test_int8_ir_file_name_carries_the_recipe(tmp_path, monkeypatch):
    from tembed.backends import quantize

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    (folder / "int8-ov-v1.xml").write_text("<the old cache: never reused>")
    (folder / "int8-ov-v1.bin").write_bytes(b"")
    built = []

    def fake_write(source, target_xml, feeds, **recipe):
        built.append(recipe)
        open(target_xml, "w").close()
        open(target_xml[: -len(".xml")] + ".bin", "w").close()

    monkeypatch.setattr(quantize, "tokenized_calibration", lambda *args, **kwargs: [])
    monkeypatch.setattr(quantize, "write_openvino_int8", fake_write)
    onnx_path = str(folder / "model.onnx")
    paths = {}
    for recipe in ("vnni", "no-vnni"):
        paths[recipe] = export.openvino_int8(onnx_path, "unused", ["input_ids"], False, recipe)
        assert export.openvino_int8(onnx_path, "unused", ["input_ids"], False, recipe) == paths[recipe]
    assert os.path.basename(paths["vnni"]) == "int8-ov-v2-vnni.xml"
    assert os.path.basename(paths["no-vnni"]) == "int8-ov-v2-no-vnni.xml"
    assert built == [quantize.OPENVINO_INT8_RECIPES["vnni"], quantize.OPENVINO_INT8_RECIPES["no-vnni"]]
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"avx2"}))
    assert export.openvino_int8(onnx_path, "unused", ["input_ids"], False) == paths["no-vnni"]
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert export.openvino_int8(onnx_path, "unused", ["input_ids"], False) == paths["vnni"]
    assert len(built) == 2


# -------------------------------------------------------------------------- item 11: unreadable cached exports
@pytest.mark.parametrize(("backend", "damage"), [("onnx", _garble), ("openvino", _truncate), ("openvino", _garble)])
def test_unreadable_export_is_rebuilt_once(cache, minilm_path, monkeypatch, backend, damage):
    pytest.importorskip(backend if backend != "onnx" else "onnxruntime")
    with Embedder(minilm_path, device="cpu", backend=backend) as first:
        expected = first.encode(["a cached export"])
    damage(os.path.join(cache, "model.onnx"))
    exports = _count_exports(monkeypatch)
    with pytest.warns(UserWarning, match=UNREADABLE) as caught:
        again = Embedder(minilm_path, device="cpu", backend=backend)
    assert any(cache in str(w.message) for w in caught)  # the warning names the folder
    with again:
        np.testing.assert_allclose(again.encode(["a cached export"]), expected, atol=1e-6)
    assert len(exports) == 1
    with Embedder(minilm_path, device="cpu", backend=backend) as third:  # rebuilt for good: no new export
        third.encode(["a cached export"])
    assert len(exports) == 1


def test_unreadable_export_json_is_rebuilt(cache, minilm_path, monkeypatch):
    with open(os.path.join(cache, "export.json"), "w") as handle:
        handle.write('{"inputs": ["input_ids", "attention')
    exports = _count_exports(monkeypatch)
    with pytest.warns(UserWarning, match=UNREADABLE):
        path = export.export_onnx(minilm_path)
    assert len(exports) == 1
    with open(os.path.join(os.path.dirname(path), "export.json"), encoding="utf-8") as handle:
        assert "token_type_ids" in json.load(handle)["inputs"]


def test_unreadable_onnx_runtime_int8_is_rebuilt(cache, minilm_path, monkeypatch):
    texts = ["int8 weights", "a second sentence, a bit longer than the first one"]
    with Embedder(minilm_path, device="cpu", backend="onnx", precision="int8") as first:
        expected = first.encode(texts)
    _truncate(os.path.join(cache, export.ONNXRUNTIME_INT8_FILE))
    with (
        pytest.warns(UserWarning, match=UNREADABLE),
        Embedder(minilm_path, device="cpu", backend="onnx", precision="int8") as again,
    ):
        np.testing.assert_allclose(again.encode(texts), expected, atol=1e-6)


@pytest.mark.parametrize("part", ["xml", "bin"])
def test_unreadable_openvino_int8_ir_is_rebuilt(cache, minilm_path, monkeypatch, part):
    """The int8 IR's .xml or .bin damaged: rebuilt (a stand-in for NNCF here, so the test takes seconds)."""
    openvino = pytest.importorskip("openvino")
    from tembed.backends import quantize

    def plain_ir(source, target_xml, feeds, **recipe):
        openvino.save_model(openvino.Core().read_model(source), target_xml)

    monkeypatch.setattr(quantize, "write_openvino_int8", plain_ir)
    with Embedder(minilm_path, device="cpu", backend="openvino", precision="int8") as first:
        expected = first.encode(["an int8 IR"])
        xml = export.openvino_int8(first.backend.onnx_path, minilm_path, [], False, first.backend.int8_recipe)
    assert os.path.dirname(xml) == cache
    (_truncate if part == "bin" else _garble)(xml[: -len(".xml")] + "." + part)
    with (
        pytest.warns(UserWarning, match=UNREADABLE),
        Embedder(minilm_path, device="cpu", backend="openvino", precision="int8") as again,
    ):
        np.testing.assert_allclose(again.encode(["an int8 IR"]), expected, atol=1e-5)


def test_a_rebuild_that_fails_too_raises(cache, minilm_path, monkeypatch):
    damage_every_export = export.export_onnx

    def export_and_damage(*args, **kwargs):
        path = damage_every_export(*args, **kwargs)
        _garble(path)
        return path

    monkeypatch.setattr(export, "export_onnx", export_and_damage)
    with pytest.raises(RuntimeError, match="was unreadable .*; rebuilding it failed too"):
        Embedder(minilm_path, device="cpu", backend="openvino")


def test_a_missing_package_or_a_full_disk_is_not_blamed_on_the_cache(cache, minilm_path, monkeypatch):
    """Only an unreadable export is rebuilt: an ImportError (nncf missing) or a file-system error passes through,
    and the valid export stays."""
    exports = _count_exports(monkeypatch)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ImportError):
        Embedder(minilm_path, device="cpu", backend="openvino", precision="int8")
    monkeypatch.delitem(sys.modules, "nncf")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    from tembed.backends import quantize

    monkeypatch.setattr(quantize, "quantize_dynamic_int8", full_disk)
    with pytest.raises(OSError, match="No space left"):
        Embedder(minilm_path, device="cpu", backend="onnx", precision="int8")
    assert exports == [] and os.path.isfile(os.path.join(cache, "model.onnx"))


# ------------------------------------------------------------------------ the export cache: keyed by content
def _copy_with_new_mtimes(source: str, target: str) -> str:
    """A copy of a model folder whose files all get new mtimes (copytree keeps them: copy2)."""
    shutil.copytree(source, target)
    later = time.time() + 10
    for root, _, names in os.walk(target):
        for name in names:
            os.utime(os.path.join(root, name), (later, later))
    return target


def test_a_copied_model_folder_reuses_the_export(cache, minilm_path, tmp_path, monkeypatch):
    """Same bytes under a new path with new mtimes: the same export, not a new one (15-30 s each)."""
    import torch

    copy = _copy_with_new_mtimes(minilm_path, str(tmp_path / "minilm-copy"))
    assert (
        os.stat(os.path.join(copy, "config.json")).st_mtime_ns
        != os.stat(os.path.join(minilm_path, "config.json")).st_mtime_ns
    )

    def no_export(*args, **kwargs):
        raise AssertionError("the copied model folder was exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    path = export.export_onnx(copy)
    assert os.path.dirname(path) == cache
    with Embedder(copy, device="cpu", backend="onnx") as embedder:
        assert embedder.backend.onnx_path == path
        embedder.encode(["a copied model"])


def test_the_cache_key_follows_the_bytes_and_hashes_each_file_once(minilm_path, tmp_path):
    options = {"masked_lm": False, "trust_remote_code": False, "opset": export.OPSET}
    copy = _copy_with_new_mtimes(minilm_path, str(tmp_path / "minilm-copy"))
    before = export._content_digest.cache_info()
    key = export.fingerprint(copy, options)
    hashed = export._content_digest.cache_info().misses - before.misses
    assert hashed == sum(1 for name in os.listdir(copy) if name.endswith(export.FINGERPRINT_SUFFIXES))
    assert export.fingerprint(copy, options) == key  # memoized: no file read again
    assert export._content_digest.cache_info().misses - before.misses == hashed
    assert key == export.fingerprint(minilm_path, options)
    assert export.fingerprint(copy, {**options, "masked_lm": True}) != key
    with open(os.path.join(copy, "config.json"), "a", encoding="utf-8") as handle:
        handle.write("\n")  # same mtime second or not: the size changed, and so did the bytes
    assert export.fingerprint(copy, options) != key


# ------------------------------------------------------------------------------ cheap imports for backend names
_IMPORT_SCRIPT = textwrap.dedent(
    """
    import json, sys, types
    # Only the backends package: the parent's __init__ (the Embedder) loads torch anyway.
    package = types.ModuleType("tembed")
    package.__path__ = [sys.argv[1]]
    sys.modules["tembed"] = package
    import tembed.backends
    import tembed.backends.base
    import tembed.backends.select
    from tembed.backends import BACKENDS, Backend, BackendOutput, TokenBatch, choose_backend, create_backend
    from tembed.backends import disable_openvino_telemetry
    loaded = sorted(name for name in ("torch", "onnxruntime", "openvino", "nncf", "transformers") if name in sys.modules)
    gpu = types.SimpleNamespace(type="cuda")
    print(json.dumps({"loaded": loaded, "gpu": choose_backend("auto", "fp32", gpu), "backends": list(BACKENDS)}))
    """
)


def test_naming_backends_imports_no_engine():
    import tembed

    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT, os.path.dirname(tembed.__file__)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"loaded": [], "gpu": "torch", "backends": ["auto", "torch", "onnx", "openvino"]}


def test_install_hints_name_real_packages(monkeypatch):
    from tembed.backends import select

    monkeypatch.setattr(select, "_installed", lambda module: False)
    for name, package in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        with pytest.raises(ImportError, match=rf"needs {package}: pip install {package}$"):
            select.backend_class(name)


# ------------------------------------------------------------------------------- item 16: staging folders/files
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_interrupted_export_leaves_no_staging(empty_cache, minilm_path, monkeypatch):
    import torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_onnx(minilm_path)
    assert os.listdir(os.path.join(empty_cache, "onnx")) == []


def test_interrupted_derived_builds_leave_nothing(tmp_path, monkeypatch):
    from tembed.backends import quantize

    onnx_path = str(tmp_path / "model.onnx")
    open(onnx_path, "w").close()

    def interrupted_build(source, target):
        with open(target, "w") as handle:
            handle.write("half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export.derived_file(onnx_path, "int8-v2.onnx", interrupted_build)
    assert os.listdir(tmp_path) == ["model.onnx"]

    def interrupted_calibration(source, target_xml, feeds, **recipe):
        open(target_xml, "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "tokenized_calibration", lambda *args, **kwargs: [])
    monkeypatch.setattr(quantize, "write_openvino_int8", interrupted_calibration)
    with pytest.raises(KeyboardInterrupt):
        export.openvino_int8(onnx_path, "unused", ["input_ids"], False, "no-vnni")
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_stale_staging_is_swept(empty_cache, minilm_path, monkeypatch):
    import torch

    parent = os.path.join(empty_cache, "onnx")
    os.makedirs(parent)
    host = export.staging_tag().split("-")[0]
    dead, alive = _dead_pid(), os.getppid()
    old = time.time() - 2 * export.STALE_STAGING_SECONDS
    entries = {
        ".export-old": True,  # an older name (no pid), two hours old
        f".export-{host}-{dead}-abc": True,  # its process is gone
        f".export-{host}-{alive}-abc": False,  # its process still runs: it may still be exporting
        ".export-0badc0de-1-abc": False,  # another machine's, recent
        ".export-fresh": False,  # recent, no pid
    }
    for name in entries:
        os.makedirs(os.path.join(parent, name, "inner"))
    os.utime(os.path.join(parent, ".export-old"), (old, old))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_onnx(minilm_path)  # sweeps before it exports
    assert sorted(os.listdir(parent)) == sorted(name for name, stale in entries.items() if not stale)


def test_stale_derived_staging_is_swept(tmp_path):
    onnx_path = str(tmp_path / "model.onnx")
    open(onnx_path, "w").close()
    host = export.staging_tag().split("-")[0]
    old = time.time() - 2 * export.STALE_STAGING_SECONDS
    stale = [f"int8-v2.onnx.{host}-{_dead_pid()}.tmp", "int8-v2.onnx.1234.tmp", f".int8-{host}-{_dead_pid()}-x"]
    for name in stale:
        path = tmp_path / name
        path.mkdir() if name.startswith(".int8-") else path.write_text("partial")
    os.utime(tmp_path / "int8-v2.onnx.1234.tmp", (old, old))

    def build(source, target):
        with open(target, "w") as handle:
            handle.write("int8")

    export.derived_file(onnx_path, "int8-v2.onnx", build)
    assert sorted(os.listdir(tmp_path)) == ["int8-v2.onnx", "model.onnx"]


def test_exports_with_external_weights_are_quantized_unfused(tmp_path):
    """ONNX Runtime's fusion tool cannot rewrite exports whose weights live in external files (models over
    ~1.5 GB): those are quantized as exported, and nothing is written in the fused file's place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tembed.backends.quantize import fuse_for_onnxruntime, uses_external_data

    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    inline, external = str(tmp_path / "inline.onnx"), str(tmp_path / "external.onnx")
    onnx.save(helper.make_model(graph), inline)
    onnx.save(helper.make_model(graph), external, save_as_external_data=True, size_threshold=0, location="w.bin")
    assert not uses_external_data(inline)
    assert uses_external_data(external)
    assert fuse_for_onnxruntime(external, str(tmp_path / "fused.onnx")) is False
    assert not os.path.exists(tmp_path / "fused.onnx")
