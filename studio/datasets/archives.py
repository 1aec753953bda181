"""Unpacking uploaded corpus archives and resolving server folders, without trusting either.

An archive comes from a browser, so every member name, type and size is hostile until checked.
The whole archive is refused, before a single byte is written, when it is a bomb (too large
in total, too many members, or expanding far more than audio ever does). Individual members
that cannot be written safely (paths that climb out or are absolute, links, devices) are
skipped with a reason, and the good files beside them are kept.

Limits (`ArchiveLimits`, defaults chosen for speech corpora):
- max_members 200,000: VCTK 0.92 has about 130,000 files (two microphones plus transcripts);
  10,000 tiny files extract in a couple of seconds.
- max_total_bytes 50 GiB of expanded data; the caller usually passes a tighter one.
- max_ratio 100: speech audio compresses 1-3x and transcripts 3-10x, so an archive (or any
  single member) expanding more than 100x is a bomb. The ratio is only judged above
  ratio_floor_bytes (10 MiB) of expanded data, so a tiny archive of text is never refused.
- max_member_bytes 2 GiB: no single utterance is that long; larger members are skipped.
- max_header_bytes 1 MiB: a PAX or GNU long-name header holds a path and a few attributes
  (PATH_MAX is 4 KiB); tarfile reads such a header whole into memory, so a bigger one is a
  bomb. Every tar header counts towards max_members, whatever its type.

This module does not import Django: the caller passes limits and roots from settings.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

GiB = 1024**3
MiB = 1024**2
_CHUNK = 1 * MiB


class ArchiveRefused(ValueError):
    """The archive as a whole is not extracted; the message says why in the person's terms."""


class FolderRefused(ValueError):
    """A server folder that is missing, not a folder, or outside the allowed roots."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 200_000
    max_total_bytes: int = 50 * GiB
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 10 * MiB
    max_member_bytes: int = 2 * GiB
    max_header_bytes: int = 1 * MiB


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class Extraction:
    """What an extraction wrote (relative POSIX paths under `root`) and what it left out, why."""

    root: Path
    files: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    bytes_written: int = 0


@dataclass(frozen=True)
class _Member:
    """The parts of a zip or tar entry that the checks need, whatever the archive kind."""

    name: str
    size: int
    compressed: int | None  # None for tar: gzip compresses the stream, not the member
    kind: str  # "file", "dir", "symlink", "hardlink", "device", "other"
    handle: object  # ZipInfo or TarInfo


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def safe_member_path(name: str) -> PurePosixPath | str:
    """The relative path to write `name` to, or a string saying why it cannot be written."""
    if "\x00" in name:
        return "its name contains a NUL byte"
    # Windows tools sometimes write backslashes; treat them as separators so "..\\x" is caught.
    normal = name.replace("\\", "/")
    if normal.startswith("/") or (len(normal) > 1 and normal[1] == ":"):
        return "it has an absolute path"
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return "its path climbs out of the folder (..)"
    if not parts:
        return "it has an empty name"
    return PurePosixPath(*parts)


def _is_junk(path: PurePosixPath) -> bool:
    # macOS adds __MACOSX/ and ._name resource forks to zips; they are never audio or text.
    return path.parts[0] == "__MACOSX" or path.name.startswith("._") or path.name == ".DS_Store"


def _zip_members(archive: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in archive.infolist():
        # Unix zips keep the st_mode in the high 16 bits; many tools leave the type bits 0.
        mode = info.external_attr >> 16
        if info.is_dir():
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
        elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            kind = "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "other"
        else:
            kind = "file"
        members.append(_Member(info.filename, info.file_size, info.compress_size, kind, info))
    return members


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.isdev():
        return "device"
    if info.isreg():
        return "file"
    return "other"


_KIND_REASONS = {
    "symlink": "it is a symbolic link (links could point outside the dataset)",
    "hardlink": "it is a hard link (links could point outside the dataset)",
    "device": "it is a device file",
    "other": "it is not a regular file",
}


def _check_totals(
    count: int, total: int, compressed: int, limits: ArchiveLimits, kind: str
) -> None:
    if count > limits.max_members:
        raise ArchiveRefused(
            f"the {kind} has more than {limits.max_members:,} entries; "
            "split it or register the folder on the server instead"
        )
    if total > limits.max_total_bytes:
        raise ArchiveRefused(
            f"the {kind} expands to more than {_human(limits.max_total_bytes)} "
            f"(at least {_human(total)}); nothing was extracted"
        )
    if total > limits.ratio_floor_bytes and total > limits.max_ratio * max(compressed, 1):
        raise ArchiveRefused(
            f"the {kind} expands {total / max(compressed, 1):.0f} times its size "
            f"({_human(compressed)} to {_human(total)}); audio never compresses that well, "
            "so it looks like a zip bomb and nothing was extracted"
        )


def _zip_declared_entries(path: Path) -> int | None:
    """The entry count the end-of-central-directory record declares, read without walking the
    directory (zipfile builds a ZipInfo per entry, so a million-entry directory costs memory
    before anything could be counted)."""
    try:
        with open(path, "rb") as f:
            record = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return None
    if not record:
        return None
    return int(record[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _scan_zip(path: Path, limits: ArchiveLimits) -> list[_Member]:
    declared = _zip_declared_entries(path)
    if declared is not None:
        _check_totals(declared, 0, 1, limits, "zip file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = _zip_members(archive)
    except zipfile.BadZipFile as exc:
        raise ArchiveRefused(f"the zip file is damaged or not a zip file ({exc})") from exc
    # The central directory is read in full above; declared sizes are enforced while reading
    # (zipfile stops at file_size and checks the CRC), so checking them here is sound.
    files = [m for m in members if m.kind == "file"]
    total = sum(m.size for m in files)
    _check_totals(len(members), total, path.stat().st_size, limits, "zip file")
    for m in files:
        if m.size > limits.ratio_floor_bytes and m.size > limits.max_ratio * max(
            m.compressed or 0, 1
        ):
            raise ArchiveRefused(
                f"{m.name!r} in the zip file expands {m.size / max(m.compressed or 0, 1):.0f} "
                f"times ({_human(m.compressed or 0)} to {_human(m.size)}); it looks like a zip "
                "bomb and nothing was extracted"
            )
    return members


# Header blocks tarfile folds into the member that follows them (PAX extended headers, GNU
# long names and links): each is read whole into memory, so each is capped and counted.
_EXTENSION_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _open_tar(path: Path, limits: ArchiveLimits) -> tarfile.TarFile:
    """A streaming TarFile whose header parser counts every header block it reads (members and
    the extension headers tarfile hides inside them) and refuses oversized or sparse ones
    before tarfile reads them into memory."""
    headers = 0

    class CountedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile_):  # called once per header block, extensions included
            nonlocal headers
            headers += 1
            if headers > limits.max_members:
                raise ArchiveRefused(
                    f"the archive has more than {limits.max_members:,} entries (headers "
                    "included); split it or register the folder on the server instead"
                )
            if self.type in _EXTENSION_TYPES and self.size > limits.max_header_bytes:
                raise ArchiveRefused(
                    f"the archive has an extended header of {_human(self.size)} (a name or "
                    f"attributes never need more than {_human(limits.max_header_bytes)}); "
                    "it looks like a tar bomb and nothing was extracted"
                )
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise ArchiveRefused(
                    f"{self.name!r} is a sparse file, which a speech corpus never holds; "
                    "nothing was extracted"
                )
            return super()._proc_member(tarfile_)

    return tarfile.open(path, mode="r|*", tarinfo=CountedTarInfo)


def _scan_tar(path: Path, limits: ArchiveLimits) -> int:
    """Read every tar header once, refusing as soon as a limit is crossed; returns the bytes
    the members declare (every kind, since a link or device of "size" N is still N bytes
    that tarfile skips over).

    Reading headers means decompressing the stream, but the ratio check stops a bomb after
    at most max_ratio times the archive's size.
    """
    compressed = path.stat().st_size
    count = total = 0
    try:
        with _open_tar(path, limits) as archive:
            for info in archive:
                count += 1
                if info.isreg():
                    total += info.size
                _check_totals(count, total, compressed, limits, "archive")
    except ArchiveRefused:
        raise
    except RecursionError as exc:
        raise ArchiveRefused(
            "the archive's headers nest without end; nothing was extracted"
        ) from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveRefused(
            f"the archive is damaged or truncated ({exc}); nothing was extracted"
        ) from exc
    return total


def _write(source, target: Path, size_limit: int) -> int:
    """Copy a member's bytes in chunks, stopping if it turns out larger than it declared."""
    written = 0
    with open(target, "xb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > size_limit:
                raise ArchiveRefused("a member is larger than its header says")
            out.write(chunk)
    return written


def _plan(
    members: Iterable[_Member], limits: ArchiveLimits, result: Extraction, seen: set[str]
) -> Iterable[tuple[_Member, PurePosixPath]]:
    """The members to write, recording a reason for each one left out."""
    for m in members:
        rel = safe_member_path(m.name)
        if isinstance(rel, str):
            result.skipped.append(Skipped(m.name, f"skipped: {rel}"))
            continue
        if m.kind == "dir":
            continue
        if m.kind != "file":
            result.skipped.append(Skipped(m.name, f"skipped: {_KIND_REASONS[m.kind]}"))
            continue
        if _is_junk(rel):
            result.skipped.append(Skipped(m.name, "skipped: macOS metadata, not part of a corpus"))
            continue
        if m.size > limits.max_member_bytes:
            result.skipped.append(
                Skipped(m.name, f"skipped: larger than {_human(limits.max_member_bytes)}")
            )
            continue
        key = rel.as_posix()
        if key in seen:
            result.skipped.append(Skipped(m.name, "skipped: the same name appears twice"))
            continue
        seen.add(key)
        yield m, rel


def _write_member(dest: Path, rel: PurePosixPath, source, m: _Member, result: Extraction) -> None:
    target = dest.joinpath(*rel.parts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A directory created from an earlier member is ours, but re-check after mkdir in case
        # a path component already existed as something else.
        if not target.parent.resolve().is_relative_to(dest.resolve()):
            result.skipped.append(Skipped(m.name, "skipped: its folder lies outside the dataset"))
            return
        written = _write(source, target, m.size)
    except ArchiveRefused:
        target.unlink(missing_ok=True)
        result.skipped.append(Skipped(m.name, "skipped: larger than its header says"))
        return
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        if target.is_file():
            target.unlink(missing_ok=True)
        result.skipped.append(Skipped(m.name, f"skipped: could not be read or written ({exc})"))
        return
    result.files.append(rel.as_posix())
    result.bytes_written += written


def extract_archive(
    archive_path: str | Path, dest: str | Path, limits: ArchiveLimits | None = None
) -> Extraction:
    """Extract a .zip or tar archive (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) into `dest`.

    The kind is read from the file's content, not its name. Raises ArchiveRefused, before
    writing anything, for bombs, damaged archives and unknown kinds.
    """
    archive_path = Path(archive_path)
    dest = Path(dest)
    limits = limits or ArchiveLimits()
    if zipfile.is_zipfile(archive_path):
        members = _scan_zip(archive_path, limits)
        _check_space(dest, sum(m.size for m in members if m.kind == "file"))
        dest.mkdir(parents=True, exist_ok=True)
        result = Extraction(dest)
        seen: set[str] = set()
        with zipfile.ZipFile(archive_path) as archive:
            for m, rel in _plan(members, limits, result, seen):
                try:
                    source = archive.open(m.handle)
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
                    # Encrypted or exotic-compression members cannot be read; say so.
                    result.skipped.append(Skipped(m.name, f"skipped: cannot be read ({exc})"))
                    continue
                with source:
                    _write_member(dest, rel, source, m, result)
        return result
    if _is_tar(archive_path, limits):
        _check_space(dest, _scan_tar(archive_path, limits))
        dest.mkdir(parents=True, exist_ok=True)
        result = Extraction(dest)
        seen = set()
        try:
            with _open_tar(archive_path, limits) as archive:
                for info in archive:
                    m = _Member(info.name, info.size, None, _tar_kind(info), info)
                    for planned, rel in _plan([m], limits, result, seen):
                        try:
                            # The standard library's "data" filter as a second opinion on what
                            # our rules let through; its message names server paths, ours not.
                            tarfile.data_filter(info, str(dest))
                        except tarfile.FilterError as exc:
                            reason = f"refused by tarfile's data filter ({type(exc).__name__})"
                            result.skipped.append(Skipped(info.name, f"skipped: {reason}"))
                            continue
                        source = archive.extractfile(info)
                        if source is not None:
                            _write_member(dest, rel, source, planned, result)
        except (tarfile.TarError, EOFError, OSError, ArchiveRefused) as exc:
            # Only possible if the file changed since the scan; keep what was written.
            result.skipped.append(Skipped("(rest of archive)", f"skipped: damaged ({exc})"))
        return result
    raise ArchiveRefused("the upload is neither a zip file nor a tar archive (.tar.gz)")


def _is_tar(path: Path, limits: ArchiveLimits) -> bool:
    """Whether the file opens as a tar stream; not tarfile.is_tarfile, which would read a
    hostile first header (a PAX header of gigabytes) whole before anything is checked."""
    try:
        with _open_tar(path, limits):
            return True
    except ArchiveRefused:
        return True  # a tar, and a hostile one: the scan refuses it with the reason
    except (tarfile.TarError, EOFError, OSError, RecursionError):
        return False


def _check_space(dest: Path, needed: int) -> None:
    probe = dest
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise ArchiveRefused(
            f"the archive expands to {_human(needed)} but only {_human(free)} is free on the server"
        )


def resolve_server_folder(raw: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Path:
    """The real folder `raw` names, provided it lies under one of `roots` after following links.

    A relative `raw` is looked up under each root in turn. Raises FolderRefused otherwise.
    A path that is outside the roots as written is refused before the file system is asked
    anything, so the answer never tells whether something exists elsewhere on the server.
    """
    configured = list(roots)
    given = [Path(os.path.abspath(r)) for r in configured]
    roots = [Path(r).resolve() for r in configured]
    if not roots:
        raise FolderRefused("no dataset folders are allowed on this server (STUDIO_DATASET_ROOTS)")
    text = os.fspath(raw).strip()
    if not text or "\x00" in text:
        raise FolderRefused("give the path of a folder")
    candidates = [Path(text)] if Path(text).is_absolute() else [r / text for r in roots]
    allowed = ", ".join(str(r) for r in roots)
    for candidate in candidates:
        lexical = Path(os.path.normpath(candidate))
        if not any(lexical == r or lexical.is_relative_to(r) for r in [*given, *roots]):
            raise FolderRefused(
                f"{text} is outside the folders this server allows ({allowed}); "
                "links that lead outside them are refused too"
            )
    for candidate in candidates:
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if not any(real == r or real.is_relative_to(r) for r in roots):
            raise FolderRefused(
                f"{text} is outside the folders this server allows ({allowed}); "
                "links that lead outside them are refused too"
            )
        if not real.is_dir():
            raise FolderRefused(f"{text} is not a folder")
        return real
    raise FolderRefused(f"{text} does not exist (allowed folders: {allowed})")
