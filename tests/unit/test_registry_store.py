"""LocalStore and digest: staged writes, read-only committed versions, content addressing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from adapters.store import LocalStore, digest


def write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def test_digest_depends_on_names_and_content_only(tmp_path: Path) -> None:
    one = write(tmp_path / "one", {"a": b"1", "b": b"2"})
    two = write(tmp_path / "two", {"b": b"2", "a": b"1"})
    os.utime(two / "a", (0, 0))
    assert digest(one) == digest(two)
    assert digest(write(tmp_path / "renamed", {"a": b"1", "c": b"2"})) != digest(one)
    assert digest(write(tmp_path / "changed", {"a": b"1", "b": b"3"})) != digest(one)
    # No ambiguity between a path and the content that follows it.
    assert digest(write(tmp_path / "x", {"ab": b""})) != digest(write(tmp_path / "y", {"a": b"b"}))


def test_staging_is_removed_on_exit_even_on_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(RuntimeError), store.staging() as staged:
        write(staged, {"a": b"1"})
        raise RuntimeError("validation failed")
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_commit_makes_a_read_only_version_dir(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with store.staging() as staged:
        write(staged, {"a": b"1"})
        sha = digest(staged)
        final = store.commit(staged, "bot", sha)
    assert final == (tmp_path / "store" / "bot" / sha).resolve()
    assert (final / "a").read_bytes() == b"1"
    assert stat.S_IMODE((final / "a").stat().st_mode) == 0o444
    assert stat.S_IMODE(final.stat().st_mode) == 0o555
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_commit_reuses_identical_and_replaces_damaged_leftovers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with store.staging() as staged:
        sha = digest(write(staged, {"a": b"1"}))
        first = store.commit(staged, "bot", sha)
    inode = first.stat().st_ino
    with store.staging() as staged:
        again = store.commit(write(staged, {"a": b"1"}), "bot", sha)
    assert again == first and again.stat().st_ino == inode

    # A leftover whose content does not match its name (a crash, a tampering) is not trusted.
    (first / "a").chmod(0o644)
    (first / "a").write_bytes(b"tampered")
    with store.staging() as staged:
        fixed = store.commit(write(staged, {"a": b"1"}), "bot", sha)
    assert (fixed / "a").read_bytes() == b"1"
    assert digest(fixed) == sha


def test_remove_deletes_the_version_and_an_emptied_adapter_dir(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    paths = []
    for content in (b"1", b"2"):
        with store.staging() as staged:
            sha = digest(write(staged, {"a": content}))
            paths.append(store.commit(staged, "bot", sha))
    store.remove(paths[0])
    assert not paths[0].exists() and paths[1].exists()
    store.remove(paths[1])
    assert not (tmp_path / "store" / "bot").exists()


def test_sweep_removes_only_old_staging_dirs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    old = write(tmp_path / "store" / ".staging" / "crashed", {"a": b"1"})
    os.utime(old, (0, 0))
    fresh = write(tmp_path / "store" / ".staging" / "in-flight", {"a": b"1"})
    assert store.sweep() == 1
    assert not old.exists() and fresh.exists()
    assert store.sweep(older_than_s=-1) == 1
    assert not fresh.exists()
