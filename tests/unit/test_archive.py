"""extract_archive: adapters arrive intact; hostile or oversized archives are refused and write nothing outside."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters import UploadLimits
from adapters.archive import extract_archive
from core.errors import InvalidAdapter, InvalidArchive, PayloadTooLarge
from tests import factories as f


def safetensors_of(size: int) -> bytes:
    """A well-formed safetensors file of exactly ``size`` bytes: one uint8 tensor after a space-padded header."""
    length = 96
    data = size - 8 - length
    header = f'{{"t":{{"dtype":"U8","shape":[{data}],"data_offsets":[0,{data}]}}}}'.encode()
    return length.to_bytes(8, "little") + header.ljust(length) + bytes(data)


FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": safetensors_of(300), "README.md": b"# hi"}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    directory = tmp_path / "source"
    directory.mkdir()
    for name, data in FILES.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    directory = tmp_path / "dest"
    directory.mkdir()
    return directory


def contents(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("suffix", ["tar.gz", "tgz", "tar", "zip"])
@pytest.mark.parametrize("top", ["adapter", ".", None])
def test_archive_of_a_directory_extracts_to_its_files(
    suffix: str, top: str | None, source: Path, dest: Path, tmp_path: Path
) -> None:
    archive = tmp_path / f"upload.{suffix}"
    if suffix == "zip":
        f.zip_of(source, archive, top=top)
    else:
        f.tar_of(source, archive, top=top, compress=suffix != "tar")
    extract_archive(archive, dest, UploadLimits())
    assert contents(dest) == FILES


def test_format_is_sniffed_not_taken_from_the_name(source: Path, dest: Path, tmp_path: Path) -> None:
    archive = f.zip_of(source, tmp_path / "upload.tar.gz")
    extract_archive(archive, dest, UploadLimits())
    assert contents(dest) == FILES


def test_a_file_named_like_the_target_itself_is_refused(dest: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArchive, match="archive member './' appears twice or clashes"):
        extract_archive(f.tar_with(tmp_path / "a.tgz", {"./": b"x"}), dest, UploadLimits())


def test_top_directory_named_like_a_child_is_stripped_once(dest: Path, tmp_path: Path) -> None:
    archive = f.tar_with(tmp_path / "a.tgz", {"adapter/adapter/x": b"1", "adapter/y": b"2"})
    extract_archive(archive, dest, UploadLimits())
    assert contents(dest) == {"adapter/x": b"1", "y": b"2"}


def test_two_top_level_directories_are_kept(dest: Path, tmp_path: Path) -> None:
    archive = f.tar_with(tmp_path / "a.tgz", {"a/x": b"1", "b/y": b"2"})
    extract_archive(archive, dest, UploadLimits())
    assert contents(dest) == {"a/x": b"1", "b/y": b"2"}


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (f.traversal_tar, "archive member 'adapter/../../escaped.txt' has a '..' component"),
        (f.absolute_path_tar, "archive member '/tmp/quiver-escaped.txt' has an absolute path"),
        (f.symlink_tar, "archive member 'adapter/adapter_config.json' is a symbolic link"),
        (lambda out: f.tar_with(out, hardlinks={"adapter/x": "/etc/passwd"}), "'adapter/x' is a hard link"),
        (lambda out: f.tar_with(out, fifos=("adapter/pipe",)), "'adapter/pipe' is a fifo"),
        (lambda out: f.zip_with(out, {"../escaped.txt": b"x"}), "'../escaped.txt' has a '..' component"),
        (lambda out: f.zip_with(out, {"/tmp/quiver-escaped.txt": b"x"}), "has an absolute path"),
        (lambda out: f.zip_with(out, {"C:/escaped.txt": b"x"}), "'C:/escaped.txt' has an absolute path"),
        (lambda out: f.zip_with(out, {}, symlinks={"adapter/README.md": "/etc/passwd"}), "is a symbolic link"),
        (lambda out: f.tar_with(out, {"a/x": b"1", "a/x/y": b"2"}), "'a/x/y' clashes with another member"),
        (lambda out: f.zip_with(out, {"a\\..\\..\\x": b"x"}), "has an invalid name"),
    ],
    ids=[
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink",
        "tar-hardlink",
        "tar-fifo",
        "zip-dotdot",
        "zip-absolute",
        "zip-drive",
        "zip-symlink",
        "file-as-dir",
        "backslash",
    ],
)
def test_unsafe_member_is_refused_by_name(
    build: Callable[[Path], Path], fragment: str, dest: Path, tmp_path: Path
) -> None:
    archive = build(tmp_path / "evil")
    with pytest.raises(InvalidArchive) as caught:
        extract_archive(archive, dest, UploadLimits())
    assert fragment in caught.value.message
    assert caught.value.status_code == 400
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/quiver-escaped.txt").exists()


def test_duplicate_member_is_refused(dest: Path, tmp_path: Path) -> None:
    # A tar can carry one name twice; the second would silently replace the first.
    archive = f.tar_with(tmp_path / "dup.tgz", [("adapter/x", b"1"), ("adapter/x", b"2")])
    with pytest.raises(InvalidArchive, match="'adapter/x' appears twice"):
        extract_archive(archive, dest, UploadLimits())


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a .tar, .tar.gz/.tgz or .zip archive"),
        (b"just some text, not an archive" * 10, "not a .tar, .tar.gz/.tgz or .zip archive"),
        (b"\x1f\x8b\x08\x00garbage", "archive is unreadable"),
    ],
)
def test_not_an_archive_is_refused(data: bytes, fragment: str, dest: Path, tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    with pytest.raises(InvalidArchive, match=fragment):
        extract_archive(upload, dest, UploadLimits())


def test_truncated_archive_is_refused(source: Path, dest: Path, tmp_path: Path) -> None:
    whole = f.tar_of(source, tmp_path / "whole.tgz").read_bytes()
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidArchive, match="archive is unreadable"):
        extract_archive(cut, dest, UploadLimits())


def test_archive_over_the_upload_limit_is_refused_before_reading(source: Path, dest: Path, tmp_path: Path) -> None:
    archive = f.tar_of(source, tmp_path / "a.tgz")
    with pytest.raises(PayloadTooLarge, match=r"archive is \d+ bytes; the limit is 100 bytes") as caught:
        extract_archive(archive, dest, UploadLimits(max_archive_bytes=100))
    assert caught.value.status_code == 413
    assert contents(dest) == {}


def test_too_many_members_is_refused(dest: Path, tmp_path: Path) -> None:
    archive = f.tar_with(tmp_path / "many.tgz", {f"adapter/{i}": b"x" for i in range(5)})
    with pytest.raises(PayloadTooLarge, match="more than 4 members"):
        extract_archive(archive, dest, UploadLimits(max_members=4))


def test_member_over_the_member_limit_is_refused(source: Path, dest: Path, tmp_path: Path) -> None:
    archive = f.tar_of(source, tmp_path / "a.tgz")
    with pytest.raises(PayloadTooLarge, match="'adapter/adapter_model.safetensors' is larger than 200 bytes"):
        extract_archive(archive, dest, UploadLimits(max_member_bytes=200))


def test_total_over_the_extraction_limit_is_refused(source: Path, dest: Path, tmp_path: Path) -> None:
    archive = f.zip_of(source, tmp_path / "a.zip")
    with pytest.raises(PayloadTooLarge, match="extracts to more than 310 bytes"):
        extract_archive(archive, dest, UploadLimits(max_extracted_bytes=310))


def test_zip_bomb_is_stopped(dest: Path, tmp_path: Path) -> None:
    bomb = f.zip_bomb(tmp_path / "bomb.zip", 64 * 1024 * 1024)
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(PayloadTooLarge, match="larger than 1048576 bytes"):
        extract_archive(bomb, dest, UploadLimits(max_member_bytes=1024 * 1024))
    assert sum(len(v) for v in contents(dest).values()) <= 1024 * 1024


def test_zip_member_that_lies_about_its_size_is_refused(dest: Path, tmp_path: Path) -> None:
    # Declares 10 bytes, inflates to 100 000: the declared size passes the limit, the data must not.
    liar = f.lying_zip(tmp_path / "liar.zip", real_size=100_000, declared_size=10)
    with pytest.raises(InvalidArchive, match="adapter/adapter_config.json"):
        extract_archive(liar, dest, UploadLimits(max_extracted_bytes=1000))
    assert sum(len(v) for v in contents(dest).values()) <= 1000


def test_target_must_be_empty(source: Path, dest: Path, tmp_path: Path) -> None:
    (dest / "stale").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        extract_archive(f.tar_of(source, tmp_path / "a.tgz"), dest, UploadLimits())


GiB = 1024**3


def written(directory: Path) -> int:
    return sum(len(v) for v in contents(directory).values())


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_decompression_bomb_is_refused_after_a_few_megabytes(kind: str, dest: Path, tmp_path: Path) -> None:
    # 3 GiB of zeros in about 3 MB (a 64 MiB zip, to keep building it cheap) cost 6-11 s of CPU before.
    if kind == "zip":
        bomb = f.zip_with(tmp_path / "bomb.zip", {"adapter/README.md": bytes(64 * 1024 * 1024)})
    else:
        bomb = f.tar_bomb(tmp_path / "bomb.tgz", 3 * GiB, name="adapter/README.md")
    assert bomb.stat().st_size < 4 * 1024 * 1024
    started = time.process_time()
    with pytest.raises(InvalidArchive, match=r"archive member 'adapter/README.md' inflates more than 20x") as caught:
        extract_archive(bomb, dest, UploadLimits())
    assert time.process_time() - started < 0.5
    assert caught.value.status_code == 400
    assert written(dest) <= 2 * 1024 * 1024


def test_a_safetensors_member_with_a_bad_header_is_refused_before_its_body_is_written(
    dest: Path, tmp_path: Path
) -> None:
    bomb = f.tar_bomb(tmp_path / "zeros.tgz", 3 * GiB)  # adapter/adapter_model.safetensors of zeros
    started = time.process_time()
    with pytest.raises(InvalidAdapter, match="its header length 0 does not fit") as caught:
        extract_archive(bomb, dest, UploadLimits())
    assert time.process_time() - started < 0.5
    assert caught.value.status_code == 422
    assert written(dest) == 0


def test_a_safetensors_header_must_account_for_every_byte_after_it(dest: Path, tmp_path: Path) -> None:
    # A well-formed header for 196 bytes of tensors, then gigabytes that no tensor claims.
    head = safetensors_of(300)[:104]
    bomb = f.tar_bomb(tmp_path / "padded.tgz", 3 * GiB, head=head)
    with pytest.raises(InvalidAdapter, match=r"its tensors take 196 bytes, but \d+ follow the header"):
        extract_archive(bomb, dest, UploadLimits())
    assert written(dest) == 0


@pytest.mark.parametrize(
    ("header", "fragment"),
    [(b"not json", "its header is not JSON"), (b"[1]", "not a JSON object"), (b'{"t": {}}', "no data_offsets")],
)
def test_a_safetensors_header_must_be_a_json_object_of_tensors(
    header: bytes, fragment: str, dest: Path, tmp_path: Path
) -> None:
    data = len(header).to_bytes(8, "little") + header
    archive = f.tar_with(tmp_path / "a.tgz", {"adapter/adapter_model.safetensors": data})
    with pytest.raises(InvalidAdapter, match=fragment):
        extract_archive(archive, dest, UploadLimits())


def test_weights_that_compress_like_real_ones_extract(dest: Path, tmp_path: Path) -> None:
    # Random values with the B half all zeros, as a LoRA is before training: about 2x, well under the bound.
    weights = safetensors_of(16 * 1024 * 1024)
    half = len(weights) // 2
    weights = weights[:104] + os.urandom(half - 104) + bytes(len(weights) - half)
    archive = f.tar_with(tmp_path / "a.tgz", {"adapter/adapter_model.safetensors": weights})
    extract_archive(archive, dest, UploadLimits())
    assert contents(dest) == {"adapter_model.safetensors": weights}
