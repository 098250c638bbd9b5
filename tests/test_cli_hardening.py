"""``tembed encode`` hardening: the output lock, output = input, resume across a model change, a full or read-only
output, stdin interrupts, model load errors and a folder given as the input (issue 10).

Runs go through the real command line (typer's CliRunner, in-process) with one torch encoder per set of model
options shared between runs (``tembed.cli.encode.open_job_encoder`` replaced);
the lock test runs a second, real ``python -m tembed.cli encode`` process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tembed.cli import app
from tembed.cli import encode as cli_encode
from test_cli_encode import interrupt_at_part

from realdata import sts_b_sentences

MAX_LENGTH = 32


class _Reports:
    """The shared torch CPU encoder, reporting the backend and device a run asked for (to test --resume's checks
    without an ONNX export or a GPU); closing it leaves it open for the next run."""

    def __init__(self, encoder, backend_name: str, device: str) -> None:
        self._encoder = encoder
        self.settings = encoder.settings.replace(backend=backend_name, device=device)

    def encode(self, texts, options):
        return self._encoder.encode(texts, options)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def loads():
    """Replace the CLI's opener: one torch CPU encoder per distinct set of model options (the backend aside),
    shared between runs; counts the loads."""
    from tembed.encoder import open_encoder

    cache: dict = {}
    calls: list = []

    def open_job_encoder(config, device):
        calls.append(config.model)
        key = config.replace(backend="torch")
        if key not in cache:
            cache[key] = open_encoder(key, "cpu")
        reported = ",".join(device) if isinstance(device, list) else device or "cpu"
        return _Reports(cache[key], "torch" if config.backend == "auto" else config.backend, reported)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_encode, "open_job_encoder", open_job_encoder)
        yield calls
    for encoder in cache.values():
        encoder.close()


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str]]:
    return [(f"s-{index:03d}", text) for index, text in enumerate(sts_b_sentences("test")[:60])]


def invoke(*args: str, stdin: bytes | None = None):
    return CliRunner().invoke(app, ["encode", *args], input=stdin, catch_exceptions=False)


def encode_ok(*args: str, stdin: bytes | None = None):
    result = invoke(*args, stdin=stdin)
    assert result.exit_code == 0, result.output
    return result


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows).encode()


def write_jsonl(path, rows) -> str:
    with open(path, "wb") as handle:
        handle.write(jsonl_bytes(rows))
    return str(path)


def read_parquet(path: str) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    return ids, table.column("dense").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)


def leftovers(output: str) -> list[str]:
    folder = os.path.dirname(output)
    return sorted(name for name in os.listdir(folder) if name.startswith(os.path.basename(output)))


def uninterrupted(tmp_path, source: str, *args: str) -> np.ndarray:
    output = str(tmp_path / "uninterrupted.parquet")
    encode_ok(source, "-o", output, *args)
    return read_parquet(output)[1]


# ----------------------------------------------------------------------------------------------- 5: the lock
def test_output_lock_unit(tmp_path):
    from tembed.io.checkpoint import OutputLock, OutputLocked

    output = str(tmp_path / "emb.parquet")
    first = OutputLock(output)
    first.acquire()
    with open(output + ".lock", encoding="ascii") as handle:
        assert handle.read().strip() == str(os.getpid())
    with pytest.raises(OutputLocked) as refused:
        OutputLock(output).acquire()  # another open file: flock refuses it even in this process
    assert refused.value.pid == os.getpid() and f"pid {os.getpid()}" in str(refused.value)
    first.release()
    assert not os.path.exists(output + ".lock")
    with open(output + ".lock", "w", encoding="ascii") as handle:  # left by a killed run: no one holds it
        handle.write("999999999\n")
    again = OutputLock(output)
    again.acquire()
    again.release()


def test_second_run_on_the_same_output_is_refused_with_the_first_pid(loads, minilm_path, rows, tmp_path):
    """A real ``tembed encode`` reading a stdin that stays open holds OUTPUT; a second run, fresh or --resume, is
    refused naming its pid; once it is killed with SIGKILL, its stale lock file does not block."""
    source = write_jsonl(tmp_path / "c.jsonl", rows[:20])
    output = str(tmp_path / "out.parquet")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "tembed.cli", "encode", "-", "-o", output, "-m", minilm_path]
    command += ["--device", "cpu", "--backend", "torch"]
    first = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        held = ""
        while time.monotonic() < deadline and first.poll() is None:
            try:
                with open(output + ".lock", encoding="ascii") as handle:
                    held = handle.read().strip()
            except FileNotFoundError:
                pass
            if held == str(first.pid) or os.path.exists(output + ".partial"):
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1].decode()

        for extra in ([], ["--resume"], ["--restart"]):
            refused = invoke(source, "-o", output, "-m", minilm_path, *extra)
            assert refused.exit_code == 2, refused.output
            assert (
                f"pid {first.pid}" in refused.stderr and "is being written by another tembed encode" in refused.stderr
            )
            assert refused.stderr.startswith(f"error: {output} ") and len(refused.stderr.splitlines()) == 1
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()  # SIGKILL: no cleanup runs
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert os.path.exists(output + ".lock")  # stale, naming a dead pid

    done = encode_ok(source, "-o", output, "-m", minilm_path, "--restart")  # --restart: it may have left a partial
    assert "encoded 20 texts" in done.stderr
    assert leftovers(output) == ["out.parquet"]  # the lock file is removed at the end


# ----------------------------------------------------------------------------------------------- 6: output = input
def _parquet_input(folder) -> str:
    path = str(folder / "corpus.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["first text", "second text"]}), path)
    return path


@pytest.mark.parametrize("case", ["same path", "through a linked folder", "npy ids file", "rejects file"])
def test_output_that_is_the_input_is_refused(loads, minilm_path, tmp_path, case):
    loads.clear()
    if case == "same path":
        source = _parquet_input(tmp_path)
        args = ["-o", source]
    elif case == "through a linked folder":
        source = _parquet_input(tmp_path)
        os.symlink(tmp_path, tmp_path / "link")
        args = ["-o", str(tmp_path / "link" / "corpus.parquet")]
    elif case == "npy ids file":
        source = str(tmp_path / "emb.ids.txt")
        with open(source, "w", encoding="utf-8") as handle:
            handle.write("first text\nsecond text\n")
        args = ["-o", str(tmp_path / "emb.npy")]
    else:
        source = write_jsonl(tmp_path / "out.rejects.jsonl", [("a", "first text"), ("b", "second text")])
        args = ["-o", str(tmp_path / "out.parquet"), "--skip-invalid"]
    before = sorted(os.listdir(tmp_path))
    with open(source, "rb") as handle:
        original = handle.read()
    result = invoke(source, *args, "-m", minilm_path, "--chunk-size", "1")
    assert result.exit_code == 2, result.output
    assert "is the input file" in result.stderr and "choose another --output" in result.stderr
    with open(source, "rb") as handle:
        assert handle.read() == original
    assert sorted(os.listdir(tmp_path)) == before  # nothing written: no lock, no partial folder
    assert loads == []  # refused before the model loads


# ----------------------------------------------------------------------------------------------- 7: resume checks
def _interrupted_run(tmp_path, minilm_path, rows) -> tuple[list[str], str]:
    """A copy of MiniLM (weights linked), and a run on it interrupted after 2 of its 3 chunks: (its args, model)."""
    model = tmp_path / "model"
    shutil.copytree(minilm_path, model, ignore=shutil.ignore_patterns("*.safetensors"))
    for name in os.listdir(minilm_path):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(minilm_path, name), model / name)
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    output = str(tmp_path / "out.parquet")
    args = [source, "-o", output, "-m", str(model), "--max-length", str(MAX_LENGTH), "--chunk-size", "20"]
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at_part(patch, 3)
        stopped = invoke(*args)
    assert stopped.exit_code == 130 and "40 records are kept" in stopped.stderr
    return args, str(model)


def _resumes_to_the_uninterrupted_result(tmp_path, args, rows) -> None:
    resumed = encode_ok(*args, "--resume")
    assert "40 records done" in resumed.stderr
    ids, dense = read_parquet(args[2])
    assert ids == [i for i, _ in rows]
    np.testing.assert_allclose(dense, uninterrupted(tmp_path, args[0], *args[3:]), atol=1e-5)


def test_resume_refuses_another_backend_device_or_precision(loads, minilm_path, rows, tmp_path):
    """--resume is refused, naming the change, for another backend or device type (known once the model is
    loaded: the shared torch model reports the ones asked for) and another precision (before it loads)."""
    args, _ = _interrupted_run(tmp_path, minilm_path, rows)
    other_backend = invoke(*args, "--resume", "--backend", "openvino")
    assert other_backend.exit_code == 2, other_backend.output
    assert other_backend.stderr.startswith("error: cannot resume: the model differs from the interrupted run (")
    assert "backend 'torch' -> 'openvino'" in other_backend.stderr

    other_device = invoke(*args, "--resume", "--device", "cuda:1")
    assert other_device.exit_code == 2 and "device 'cpu' -> 'cuda'" in other_device.stderr, other_device.output

    loads.clear()
    other_precision = invoke(*args, "--resume", "--precision", "int8")
    assert other_precision.exit_code == 2 and "precision 'auto' -> 'int8'" in other_precision.stderr
    assert loads == []  # the options are checked before the model loads

    with open(args[2] + ".partial/manifest.json", encoding="utf-8") as handle:
        recorded = json.load(handle)["model"]
    assert recorded["backend"] == "torch" and recorded["device"] == "cpu" and len(recorded["files"]) == 24
    assert sorted(os.listdir(args[2] + ".partial")) == ["manifest.json", "part-000000.parquet", "part-000001.parquet"]
    _resumes_to_the_uninterrupted_result(tmp_path, [*args, "--batch-size", "7"], rows)  # batch size may change


def test_resume_refuses_changed_model_files(loads, minilm_path, rows, tmp_path):
    args, model = _interrupted_run(tmp_path, minilm_path, rows)
    for name in ("config.json", os.path.join("1_Pooling", "config.json")):
        config = os.path.join(model, name)
        stat = os.stat(config)
        with open(config, "rb") as handle:
            original = handle.read()
        with open(config, "ab") as handle:
            handle.write(b"\n")  # the loader still reads the same model, but these are not the same files
        changed = invoke(*args, "--resume")
        assert changed.exit_code == 2, changed.output
        assert f"the model's files changed ({model})" in changed.stderr and "--restart" in changed.stderr
        with open(config, "wb") as handle:
            handle.write(original)
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same files again
    _resumes_to_the_uninterrupted_result(tmp_path, args, rows)


def test_check_model_names_each_change(tmp_path):
    from tembed.io.checkpoint import Manifest, PartialRun, ResumeError

    partial = PartialRun(str(tmp_path / "e.parquet"))
    manifest = Manifest(input={}, options={}, model={"backend": "torch", "device": "cuda", "files": "a" * 24})
    partial.check_model(manifest, dict(manifest.model), "/m")
    with pytest.raises(ResumeError) as refused:
        partial.check_model(manifest, {"backend": "onnx", "device": "cpu", "files": "b" * 24}, "/m")
    message = str(refused.value)
    assert "backend 'torch' -> 'onnx'" in message and "device 'cuda' -> 'cpu'" in message
    assert "the model's files changed (/m)" in message


# ----------------------------------------------------------------------------------------------- 14: cannot write
def test_unwritable_output_is_reported_before_the_model_loads(loads, minilm_path, rows, tmp_path):
    """Tests run as root, for whom permissions do not block writes: /sys refuses new files even to root (sysfs;
    read-only in most containers), and a regular file cannot hold a folder."""
    source = write_jsonl(tmp_path / "c.jsonl", rows[:5])
    if not os.path.isdir("/sys") or _can_create("/sys/tembed-probe"):
        pytest.skip("no /sys that refuses new files here")
    loads.clear()
    result = invoke(source, "-o", "/sys/tembed-test.parquet", "-m", minilm_path)
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: cannot write /sys/tembed-test.parquet (/sys/tembed-test.parquet.lock): ")
    assert loads == []

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    inside = invoke(source, "-o", str(a_file / "emb.parquet"), "-m", minilm_path)
    assert inside.exit_code == 2 and inside.stderr == f"error: {a_file / 'emb.parquet'}: {a_file} is not a folder\n"
    assert loads == []


def _can_create(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError:
        return False
    os.remove(path)
    return True


def _enospc(path):
    with open(str(path) + ".tmp", "wb") as handle:  # a half-written file, as a full disk leaves
        handle.write(b"PAR1")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_the_run_keeps_the_records_for_resume(loads, minilm_path, rows, tmp_path):
    from tembed.io import writers

    source = write_jsonl(tmp_path / "c.jsonl", rows)
    output = str(tmp_path / "out.parquet")
    args = [source, "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH), "--chunk-size", "20"]
    real, calls = writers.write_part, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            writers, "write_part", lambda p, t: calls.append(p) or (real(p, t) if len(calls) < 3 else _enospc(p))
        )
        full = invoke(*args)
    assert full.exit_code == 1, full.output
    assert full.stderr == (
        f"error: cannot write {output}: No space left on device; 40 records are kept in {output}.partial, "
        f"rerun with --resume when there is room\n"
    )
    assert sorted(os.listdir(output + ".partial")) == ["manifest.json", "part-000000.parquet", "part-000001.parquet"]
    assert leftovers(output) == ["out.parquet.partial"]  # no lock left behind

    with pytest.MonkeyPatch.context() as patch:  # full again while merging: all 60 are kept
        patch.setattr(writers, "merge_parquet", lambda parts, destination, schema: _enospc(destination))
        merging = invoke(*args, "--resume")
    assert merging.exit_code == 1 and "; 60 records are kept in" in merging.stderr
    assert "final.tmp" not in " ".join(os.listdir(output + ".partial"))  # the half-written merge is dropped

    encode_ok(*args, "--resume")
    ids, dense = read_parquet(output)
    assert ids == [i for i, _ in rows]
    np.testing.assert_allclose(dense, uninterrupted(tmp_path, *args[:1], *args[3:]), atol=1e-5)


def test_full_disk_reading_stdin_keeps_nothing(loads, minilm_path, rows, tmp_path):
    from tembed.io import writers

    data = jsonl_bytes(rows)
    output = str(tmp_path / "out.parquet")
    real, calls = writers.write_part, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            writers, "write_part", lambda p, t: calls.append(p) or (real(p, t) if len(calls) < 2 else _enospc(p))
        )
        full = invoke("-", "-o", output, "-m", minilm_path, "--chunk-size", "20", stdin=data)
    assert full.exit_code == 1, full.output
    (line,) = full.stderr.splitlines()
    assert line.startswith(f"error: cannot write {output}: No space left on device; a run reading stdin")
    assert leftovers(output) == []


# ----------------------------------------------------------------------------------------------- 15: stdin advice
def test_interrupted_stdin_run_advises_restart_which_works(loads, minilm_path, rows, tmp_path):
    data = jsonl_bytes(rows)
    output = str(tmp_path / "out.parquet")
    args = ["-", "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH), "--chunk-size", "20"]
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at_part(patch, 3)
        stopped = invoke(*args, stdin=data)
    assert stopped.exit_code == 130
    assert "--restart" in stopped.stderr and "--resume" not in stopped.stderr, stopped.stderr
    assert leftovers(output) == ["out.parquet.partial"]

    again = invoke(*args, stdin=data)  # the advice for the folder left behind works for stdin too
    assert again.exit_code == 2 and "--restart" in again.stderr and "--resume" not in again.stderr, again.stderr
    restarted = encode_ok(*args, "--restart", stdin=data)
    assert "encoded 60 texts" in restarted.stderr
    assert read_parquet(output)[0] == [i for i, _ in rows]
    assert leftovers(output) == ["out.parquet"]


def test_bad_record_on_stdin_advises_restart(loads, minilm_path, rows, tmp_path):
    lines = [json.dumps({"id": i, "text": t}) for i, t in rows[:6]]
    data = ("\n".join([*lines[:4], '{"id": "bad"}', *lines[4:]]) + "\n").encode()
    output = str(tmp_path / "out.parquet")
    args = ["-", "-o", output, "-m", minilm_path, "--chunk-size", "2"]
    stopped = invoke(*args, stdin=data)
    assert stopped.exit_code == 1
    assert "--restart --skip-invalid" in stopped.stderr and "--resume" not in stopped.stderr, stopped.stderr
    encode_ok(*args, "--restart", "--skip-invalid", stdin=data)
    assert read_parquet(output)[0] == [i for i, _ in rows[:6]]


# ----------------------------------------------------------------------------------------------- 11: load errors
@pytest.mark.parametrize(
    "error",
    [RuntimeError("ONNX export failed\nTraceback-like detail"), ImportError("No module named 'openvino'")],
)
def test_model_load_errors_are_one_line(rows, tmp_path, monkeypatch, error):
    def fail(config, device):
        raise error

    monkeypatch.setattr(cli_encode, "open_job_encoder", fail)
    source = write_jsonl(tmp_path / "c.jsonl", rows[:5])
    output = str(tmp_path / "out.parquet")
    result = invoke(source, "-o", output, "-m", "some-model", "--backend", "openvino")
    assert result.exit_code == 2
    first_line = str(error).splitlines()[0]
    assert result.stderr == f"error: cannot load some-model: {type(error).__name__}: {first_line}\n"
    assert leftovers(output) == []  # the lock is released


# ----------------------------------------------------------------------------------------------- 17: a folder
@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus"])
def test_directory_as_input(loads, minilm_path, tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    result = invoke(str(folder), "-o", str(tmp_path / "out.parquet"), "-m", minilm_path)
    assert result.exit_code == 2
    assert result.stderr == f"error: {folder}: is a directory, not a file\n"


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(loads, minilm_path, rows, tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    source = write_jsonl(tmp_path / "in.jsonl", rows[:5])
    output = str(tmp_path / "out.parquet")
    with pytest.warns(RuntimeWarning, match="does not support locks"):
        encode_ok(source, "-o", output, "-m", minilm_path)
    assert read_parquet(output)[0] == [identifier for identifier, _ in rows[:5]]


def test_model_fingerprint_ignores_an_output_written_inside_the_model_folder(minilm_path, tmp_path):
    from tembed.io.checkpoint import model_fingerprint

    folder = str(tmp_path / "model")
    shutil.copytree(minilm_path, folder)
    before = model_fingerprint(folder)
    os.makedirs(os.path.join(folder, "emb.parquet.partial"))
    with open(os.path.join(folder, "emb.parquet.partial", "manifest.json"), "w", encoding="utf-8") as handle:
        handle.write("{}")
    assert model_fingerprint(folder) == before
