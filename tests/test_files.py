"""The cache's produce-once machinery: an incomplete entry is produced again, two runs sharing a key produce it once."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from blip_triton_bench.host.files import (
    CONTENTS_FILENAME,
    contents_problem,
    ownership_problem,
    produce_directory,
    record_contents,
)

pytestmark = pytest.mark.unit


def has_model(directory: Path) -> bool:
    return (directory / "model.onnx").is_file() and (directory / "export.json").is_file()


def test_an_incomplete_entry_is_produced_again_and_the_log_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = tmp_path / "exports" / "tiny-abc"
    entry.mkdir(parents=True)
    (entry / "model.onnx").write_bytes(b"an old graph")  # no export.json: a copy cut short

    def produce(work_dir: Path) -> None:
        (work_dir / "model.onnx").write_bytes(b"graph")
        (work_dir / "export.json").write_text("{}")

    with caplog.at_level(logging.WARNING, logger="blip_triton_bench.host.files"):
        assert produce_directory(entry, "abc", produce, has_model)

    assert (entry / "model.onnx").read_bytes() == b"graph"
    assert has_model(entry)
    assert f"{entry}: no .contents.json (written by an older version, or the entry was cut short); removing it" in (
        caplog.text
    )
    assert sorted(p.name for p in entry.parent.iterdir()) == [".tiny-abc.lock", "tiny-abc"]  # no temp dir left


def test_contents_are_recorded_and_every_kind_of_damage_is_named(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    (entry / "sub").mkdir(parents=True)
    (entry / "model.onnx").write_bytes(b"graph bytes")
    (entry / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    record_contents(entry)
    assert contents_problem(entry) is None

    (entry / "sub" / "weights.bin").write_bytes(b"\x00" * 999 + b"\x01")
    assert contents_problem(entry) == "sub/weights.bin changed since it was recorded (SHA-256 differs)"
    (entry / "sub" / "weights.bin").write_bytes(b"\x00" * 500)
    assert contents_problem(entry) == "sub/weights.bin is 500 bytes, recorded as 1000"
    (entry / "sub" / "weights.bin").unlink()
    (entry / "extra.txt").write_text("x")
    assert contents_problem(entry) == (
        "files differ from the record (missing: ['sub/weights.bin']; not recorded: ['extra.txt'])"
    )
    (entry / CONTENTS_FILENAME).write_bytes(b"\xff")
    assert contents_problem(entry).startswith(f"{CONTENTS_FILENAME} is unreadable (")
    (entry / CONTENTS_FILENAME).unlink()
    assert contents_problem(entry).startswith(f"no {CONTENTS_FILENAME}")


def test_an_entry_whose_contents_changed_is_produced_again_under_the_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = tmp_path / "exports" / "tiny-abc"
    calls: list[Path] = []

    def produce(work_dir: Path) -> None:
        calls.append(work_dir)
        (work_dir / "model.onnx").write_bytes(b"graph")
        (work_dir / "export.json").write_text("{}")

    assert produce_directory(entry, "abc", produce, has_model)
    assert not produce_directory(entry, "abc", produce, has_model)  # whole: reused
    (entry / "model.onnx").write_bytes(b"gra")  # cut short
    with caplog.at_level(logging.WARNING, logger="blip_triton_bench.host.files"):
        assert produce_directory(entry, "abc", produce, has_model)

    assert len(calls) == 2
    assert (entry / "model.onnx").read_bytes() == b"graph"
    assert "model.onnx is 3 bytes, recorded as 5; removing it and producing it again" in caplog.text


def blocked_lock_requests(path: Path) -> int:
    """Lock requests waiting on `path` right now: the kernel lists each in /proc/locks with `->` before it."""
    status = path.stat()
    file_id = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    return sum(
        1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line.split() and file_id in line.split()
    )


def test_two_runs_sharing_a_key_produce_it_once(tmp_path: Path) -> None:
    entry = tmp_path / "exports" / "tiny-abc"
    lock = entry.parent / ".tiny-abc.lock"
    calls: list[str] = []
    waited: list[bool] = []
    started, second_done = threading.Event(), threading.Event()

    def produce(work_dir: Path) -> None:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "first":
            started.set()
            # Hold the entry until the second run is seen blocked on its lock, however slow the host. Without the
            # lock the second never blocks: it produces the entry itself and ends, and this one stops waiting.
            deadline = time.monotonic() + 60  # a hang guard only
            while not blocked_lock_requests(lock) and not second_done.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            waited.append(blocked_lock_requests(lock) == 1)
        (work_dir / "model.onnx").write_bytes(b"graph")
        (work_dir / "export.json").write_text("{}")

    produced: dict[str, bool] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            produced[name] = produce_directory(entry, "abc", produce, has_model)
        except BaseException as error:  # collected and asserted in the test, not in the thread
            errors.append(error)
        finally:
            if name == "second":
                second_done.set()

    first = threading.Thread(target=run, args=("first",), name="first")
    second = threading.Thread(target=run, args=("second",), name="second")
    first.start()
    assert started.wait(60)
    second.start()
    first.join(60)
    second.join(60)

    assert waited == [True]  # the second run asked while the first was producing, and waited for it
    assert errors == []
    assert calls == ["first"]
    assert produced == {"first": True, "second": False}
    assert has_model(entry)


def test_a_failed_produce_leaves_no_entry_and_releases_the_lock(tmp_path: Path) -> None:
    entry = tmp_path / "tiny-abc"

    def fail(work_dir: Path) -> None:
        (work_dir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        produce_directory(entry, "abc", fail, has_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-abc.lock"]

    def produce(work_dir: Path) -> None:
        (work_dir / "model.onnx").write_bytes(b"graph")
        (work_dir / "export.json").write_text("{}")

    assert produce_directory(entry, "abc", produce, has_model)  # the lock was released: no deadlock


def test_an_export_entry_without_export_json_is_exported_again(tmp_path: Path) -> None:
    from blip_triton_bench.model.export import ArtifactIdentity, cached_artifact

    entry = tmp_path / "exports" / "tiny-abc"
    entry.mkdir(parents=True)
    (entry / "model.onnx").write_bytes(b"an old graph")  # was a bare AssertionError on every run
    calls: list[Path] = []

    def produce(work_dir: Path) -> None:
        calls.append(work_dir)
        (work_dir / "model.onnx").write_bytes(b"graph")

    identity = ArtifactIdentity("abc", "tiny", 1, 17)
    exported = cached_artifact(entry, identity, produce)
    again = cached_artifact(entry, identity, produce)

    assert len(calls) == 1
    assert not exported.from_cache and again.from_cache
    assert exported.onnx_path.read_bytes() == b"graph"
    assert (exported.cache_key, exported.opset) == ("abc", 17)


def test_a_folder_of_another_user_or_under_one_is_named(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    me = os.geteuid()
    assert ownership_problem(mine) is None
    assert ownership_problem(mine / "not-yet" / "deeper") is None  # made by this user when first used
    assert ownership_problem(mine, uid=me + 4242) == f"{mine} belongs to uid {me}, not to this user (uid {me + 4242})"
    if me != 0:
        pytest.skip("giving a folder to another user needs root: the other-owner cases are not exercised")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    assert ownership_problem(theirs) == f"{theirs} belongs to uid 4242, not to this user (uid 0)"
    assert ownership_problem(theirs / "cache") == (
        f"{theirs}, where {theirs / 'cache'} would be made, belongs to uid 4242, not to this user (uid 0)"
    )
    theirs.chmod(0o1777)  # sticky, like /tmp: nobody may replace another user's entries there
    assert ownership_problem(theirs / "cache") is None


def test_bytecode_python_writes_while_an_entry_is_used_is_not_a_change(tmp_path: Path) -> None:
    """A stub environment is a venv: running it writes __pycache__ folders, which must not make it a rebuild."""
    entry = tmp_path / "venv"
    (entry / "lib" / "numpy").mkdir(parents=True)
    (entry / "lib" / "numpy" / "core.py").write_text("x = 1\n")
    record_contents(entry)
    (entry / "lib" / "numpy" / "__pycache__").mkdir()
    (entry / "lib" / "numpy" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\x00bytecode")
    assert contents_problem(entry) is None
    (entry / "lib" / "numpy" / "core.py").write_text("x = 2\n")
    assert contents_problem(entry) == "lib/numpy/core.py changed since it was recorded (SHA-256 differs)"
