"""Archive extraction and server folders against hostile input, with archives built here."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from studio.datasets.archives import (
    ArchiveLimits,
    ArchiveRefused,
    FolderRefused,
    extract_archive,
    resolve_server_folder,
    safe_member_path,
)

GOOD = {"corpus/metadata.csv": b"audio_file|text|speaker_name\n", "corpus/wavs/a.wav": b"RIFF" * 50}


def reasons(result) -> dict[str, str]:
    return {s.name: s.reason for s in result.skipped}


def all_paths(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            # A bare ZipInfo keeps hostile names as written (zf.write would clean them).
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def add_tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            add_tar_file(tf, name, data)
    return path


def test_safe_member_path():
    assert str(safe_member_path("a/./b//c.wav")) == "a/b/c.wav"
    assert "climbs out" in safe_member_path("a/../../etc/passwd")
    assert "climbs out" in safe_member_path("..\\..\\evil.bat")
    assert "absolute" in safe_member_path("/etc/passwd")
    assert "absolute" in safe_member_path("C:\\Windows\\evil.dll")
    assert "NUL" in safe_member_path("a\x00b")
    assert "empty" in safe_member_path("./")


def test_zip_slip_absolute_and_symlinks_are_skipped_good_files_kept(tmp_path: Path):
    archive = make_zip(
        tmp_path / "hostile.zip",
        {
            **GOOD,
            "../evil.txt": b"x",
            "corpus/../../evil2.txt": b"x",
            "/tmp/absolute-evil.txt": b"x",
            "C:\\evil.txt": b"x",
            "__MACOSX/corpus/._a.wav": b"junk",
        },
        symlinks={"corpus/wavs/passwd.wav": "/etc/passwd"},
    )
    dest = tmp_path / "out"
    result = extract_archive(archive, dest)
    assert sorted(result.files) == sorted(GOOD)
    assert all_paths(dest) == set(GOOD)
    assert (dest / "corpus/wavs/a.wav").read_bytes() == GOOD["corpus/wavs/a.wav"]
    why = reasons(result)
    assert "climbs out" in why["../evil.txt"]
    assert "climbs out" in why["corpus/../../evil2.txt"]
    assert "absolute" in why["/tmp/absolute-evil.txt"]
    assert "absolute" in why["C:\\evil.txt"]
    assert "symbolic link" in why["corpus/wavs/passwd.wav"]
    assert "macOS" in why["__MACOSX/corpus/._a.wav"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil2.txt").exists()
    assert not Path("/tmp/absolute-evil.txt").exists()


def test_tar_links_devices_and_slips_are_skipped(tmp_path: Path):
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in GOOD.items():
            add_tar_file(tf, name, data)
        add_tar_file(tf, "../evil.txt", b"x")
        add_tar_file(tf, "/abs-evil.txt", b"x")
        link = tarfile.TarInfo("corpus/wavs/link.wav")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("corpus/wavs/hard.wav")
        hard.type, hard.linkname = tarfile.LNKTYPE, "corpus/wavs/a.wav"
        tf.addfile(hard)
        dev = tarfile.TarInfo("corpus/null")
        dev.type = tarfile.CHRTYPE
        tf.addfile(dev)
        fifo = tarfile.TarInfo("corpus/pipe")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    dest = tmp_path / "out"
    result = extract_archive(archive, dest)
    assert sorted(result.files) == sorted(GOOD)
    assert all_paths(dest) == set(GOOD)
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    why = reasons(result)
    assert "climbs out" in why["../evil.txt"]
    assert "absolute" in why["/abs-evil.txt"]
    assert "symbolic link" in why["corpus/wavs/link.wav"]
    assert "hard link" in why["corpus/wavs/hard.wav"]
    assert "device" in why["corpus/null"]
    assert "device" in why["corpus/pipe"]


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path):
    bomb = make_zip(tmp_path / "bomb.zip", {**GOOD, "corpus/silence.wav": bytes(64 * 1024**2)})
    assert bomb.stat().st_size < 1024**2
    dest = tmp_path / "out"
    with pytest.raises(ArchiveRefused, match="zip bomb") as exc:
        extract_archive(bomb, dest)
    assert "times" in str(exc.value) and "nothing was extracted" in str(exc.value)
    assert not dest.exists()


def test_one_bomb_member_hidden_among_real_data_is_refused(tmp_path: Path):
    # The whole archive's ratio looks harmless; the single member does not.
    members = {**GOOD, "corpus/noise.bin": os.urandom(2 * 1024**2)}
    members["corpus/huge.wav"] = bytes(40 * 1024**2)
    archive = make_zip(tmp_path / "sneaky.zip", members)
    with pytest.raises(ArchiveRefused, match=r"'corpus/huge\.wav' .* zip bomb"):
        extract_archive(archive, tmp_path / "out", ArchiveLimits(max_ratio=30))
    assert not (tmp_path / "out").exists()


def test_tar_gz_bomb_is_refused(tmp_path: Path):
    bomb = make_tar(tmp_path / "bomb.tar.gz", {"corpus/silence.wav": bytes(64 * 1024**2)})
    with pytest.raises(ArchiveRefused, match="zip bomb"):
        extract_archive(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_total_size_and_member_count_limits(tmp_path: Path, kind: str):
    members = {f"corpus/f{n}.bin": os.urandom(64 * 1024) for n in range(20)}
    path = tmp_path / f"big.{kind}"
    make_zip(path, members) if kind == "zip" else make_tar(path, members)
    with pytest.raises(ArchiveRefused, match=r"expands to more than 1\.0 MiB"):
        extract_archive(path, tmp_path / "a", ArchiveLimits(max_total_bytes=1024**2))
    with pytest.raises(ArchiveRefused, match="more than 10 entries"):
        extract_archive(path, tmp_path / "b", ArchiveLimits(max_members=10))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # Within the limits the same archive extracts.
    assert len(extract_archive(path, tmp_path / "c").files) == 20


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_ten_thousand_tiny_files_extract(tmp_path: Path, kind: str):
    members = {f"corpus/txt/{n // 100:03d}/{n:05d}.txt": b"hello %d\n" % n for n in range(10_000)}
    path = tmp_path / f"tiny.{kind}"
    make_zip(path, members) if kind == "zip" else make_tar(path, members)
    result = extract_archive(path, tmp_path / "out")
    assert len(result.files) == 10_000 and result.skipped == []
    assert (tmp_path / "out/corpus/txt/099/09999.txt").read_bytes() == b"hello 9999\n"


def test_damaged_archives_give_clear_messages(tmp_path: Path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ArchiveRefused, match="neither a zip file nor a tar archive"):
        extract_archive(junk, tmp_path / "out")
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    with pytest.raises(ArchiveRefused, match="neither"):
        extract_archive(empty, tmp_path / "out")
    good = make_tar(tmp_path / "t.tar.gz", {"a.bin": os.urandom(200_000)})
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[:50_000])
    with pytest.raises(ArchiveRefused, match="damaged or truncated"):
        extract_archive(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_member_is_skipped_and_the_rest_kept(tmp_path: Path):
    path = tmp_path / "crc.zip"
    payload = b"A" * 1000
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("corpus/bad.wav", payload)
        zf.writestr("corpus/good.wav", b"B" * 1000)
    data = bytearray(path.read_bytes())
    data[data.index(payload) + 10] ^= 0xFF  # break the stored bytes, not the headers
    path.write_bytes(bytes(data))
    result = extract_archive(path, tmp_path / "out")
    assert result.files == ["corpus/good.wav"]
    assert "could not be read" in reasons(result)["corpus/bad.wav"]
    assert not (tmp_path / "out/corpus/bad.wav").exists()


def test_duplicate_names_keep_the_first(tmp_path: Path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tf:
        add_tar_file(tf, "a.txt", b"first")
        add_tar_file(tf, "./a.txt", b"second")
    result = extract_archive(path, tmp_path / "out")
    assert result.files == ["a.txt"]
    assert (tmp_path / "out/a.txt").read_bytes() == b"first"
    assert "appears twice" in reasons(result)["./a.txt"]


# ---------------------------------------------------------------------------------------------
# Server folders


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    allowed = tmp_path / "datasets"
    (allowed / "ljs" / "wavs").mkdir(parents=True)
    (allowed / "notes.txt").write_text("x")
    (tmp_path / "private").mkdir()
    (allowed / "escape").symlink_to(tmp_path / "private")
    (allowed / "inner").symlink_to(allowed / "ljs")
    return [allowed]


def test_folders_inside_the_roots_resolve(roots: list[Path]):
    allowed = roots[0]
    assert resolve_server_folder(str(allowed / "ljs"), roots) == (allowed / "ljs").resolve()
    assert resolve_server_folder("ljs/wavs", roots) == (allowed / "ljs/wavs").resolve()
    # A link that stays inside the roots is fine.
    assert resolve_server_folder("inner", roots) == (allowed / "ljs").resolve()


def test_folders_outside_the_roots_are_refused(roots: list[Path], tmp_path: Path):
    allowed = roots[0]
    for raw in (str(tmp_path / "private"), "escape", "../private", "ljs/../../private", "/etc"):
        with pytest.raises(FolderRefused, match="outside the folders this server allows"):
            resolve_server_folder(raw, roots)
    with pytest.raises(FolderRefused, match="does not exist"):
        resolve_server_folder("nope", roots)
    with pytest.raises(FolderRefused, match="not a folder"):
        resolve_server_folder(str(allowed / "notes.txt"), roots)
    with pytest.raises(FolderRefused, match="give the path"):
        resolve_server_folder("  ", roots)
    with pytest.raises(FolderRefused, match="STUDIO_DATASET_ROOTS"):
        resolve_server_folder(str(allowed), [])


# ---------------------------------------------------------------------------------------------
# Tar bombs past the size checks: headers that tarfile reads whole, members of every type


def _gz_tar_with_raw_header(path: Path, kind: bytes, declared: int, then: dict[str, bytes]):
    """A .tar.gz whose first block is an extension header (PAX 'x' or GNU long name 'L')
    declaring `declared` bytes, streamed out in zeros (a few KB once gzipped)."""
    import gzip

    header = tarfile.TarInfo("././@LongHeader")
    header.type = kind
    header.size = declared
    with gzip.open(path, "wb", compresslevel=1) as gz:
        gz.write(header.tobuf(tarfile.USTAR_FORMAT))
        zeros = bytes(1024**2)
        left = declared + (-declared % 512)
        while left:
            gz.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in then.items():
                add_tar_file(tf, name, data)
    return path


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_huge_extension_header_is_refused_without_reading_it(tmp_path: Path, kind: bytes):
    import tracemalloc

    bomb = _gz_tar_with_raw_header(tmp_path / "h.tar.gz", kind, 64 * 1024**2, GOOD)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveRefused, match=r"extended header of 64\.0 MiB"):
            extract_archive(bomb, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024**2, f"{peak / 1024**2:.0f} MiB allocated"  # tarfile read 64 MiB
    assert not (tmp_path / "out").exists()


def test_every_tar_header_counts_towards_the_member_limit(tmp_path: Path):
    """Six files, each behind its own PAX header: twelve headers, and the limit is ten."""
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for n in range(6):
            info = tarfile.TarInfo(f"corpus/{n}.txt")
            info.size = 2
            info.pax_headers = {"comment": "x" * 100}
            tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ArchiveRefused, match="more than 10 entries"):
        extract_archive(path, tmp_path / "out", ArchiveLimits(max_members=10))
    assert not (tmp_path / "out").exists()
    assert len(extract_archive(path, tmp_path / "ok", ArchiveLimits(max_members=12)).files) == 6


def test_sparse_tar_members_are_refused(tmp_path: Path):
    path = tmp_path / "sparse.tar"
    info = tarfile.TarInfo("corpus/holes.wav")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 0
    with open(path, "wb") as f:
        f.write(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(ArchiveRefused, match="sparse file"):
        extract_archive(path, tmp_path / "out")


def test_tar_free_space_is_checked_like_zip(tmp_path: Path, monkeypatch):
    import shutil
    from collections import namedtuple

    path = make_tar(tmp_path / "t.tar.gz", {"corpus/a.bin": os.urandom(300_000)})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ArchiveRefused, match="only 1000 bytes is free"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_entry_count_is_read_before_the_directory_is_walked(tmp_path: Path, monkeypatch):
    path = make_zip(tmp_path / "many.zip", {f"corpus/{n}.txt": b"x" for n in range(20)})

    def walked(*args, **kwargs):
        raise AssertionError("the central directory was read")

    monkeypatch.setattr(zipfile, "ZipFile", walked)
    with pytest.raises(ArchiveRefused, match="more than 10 entries"):
        extract_archive(path, tmp_path / "out", ArchiveLimits(max_members=10))
