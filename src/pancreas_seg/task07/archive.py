"""Safe extraction of the distributed Task07 ``.tar`` archive.

Members with absolute paths, ``..`` components, or links that resolve outside the target are
refused (all offenders are listed). Extraction goes to a temporary sibling folder that is renamed
into place only when complete, so an interrupted extraction never looks like a finished dataset.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)


class UnsafeArchiveError(ValueError):
    """The archive contains members that would escape the extraction folder."""


def unsafe_members(archive: tarfile.TarFile) -> list[str]:
    """Describe every member that is absolute, contains ``..``, is a device, or links outside."""
    problems = []
    for member in archive.getmembers():
        name = PurePosixPath(member.name)
        if name.is_absolute() or member.name.startswith(("/", "\\")) or (name.parts and ":" in name.parts[0]):
            problems.append(f"{member.name}: absolute path")
        elif ".." in name.parts:
            problems.append(f"{member.name}: path contains '..'")
        elif member.isdev():
            problems.append(f"{member.name}: device or FIFO member")
        elif member.issym() or member.islnk():
            target = PurePosixPath(member.linkname)
            base = name.parent if member.issym() else PurePosixPath(".")
            resolved = os.path.normpath(str(base / target))
            if target.is_absolute() or resolved.startswith(".."):
                problems.append(f"{member.name}: link to '{member.linkname}' points outside the target folder")
    return problems


def extract_task07_archive(archive_path: str | Path, destination: str | Path) -> Path:
    """Extract ``archive_path`` into ``destination`` and return the folder holding ``dataset.json``.

    If ``destination`` already holds a completed extraction it is reused untouched.

    Raises:
        UnsafeArchiveError: listing every unsafe member (nothing is extracted).
        ValueError: the archive is unreadable or contains no dataset.json.
    """
    archive_path, destination = Path(archive_path), Path(destination)
    if destination.is_dir():
        found = _find_dataset_root(destination)
        if found is not None:
            logger.info("Reusing extracted archive at %s", found)
            return found
        raise ValueError(f"{destination}: exists but holds no dataset.json; remove it and re-run")
    try:
        archive = tarfile.open(archive_path)
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"{archive_path}: not a readable tar archive ({exc})") from exc
    with archive:
        try:
            problems = unsafe_members(archive)  # reads every member header
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise ValueError(f"{archive_path}: truncated or corrupt tar archive "
                             f"({type(exc).__name__}: {exc})") from exc
        if not _ends_with_end_of_archive_marker(archive):
            raise ValueError(f"{archive_path}: no end-of-archive marker after the last member; "
                             "the archive looks truncated (re-download it)")
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise UnsafeArchiveError(f"{archive_path}: refusing to extract unsafe members:\n{listing}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
        try:
            members = [m for m in archive.getmembers()
                       if not PurePosixPath(m.name).name.startswith("._")]
            logger.info("Extracting %d members of %s", len(members), archive_path)
            try:
                archive.extractall(partial, members=members, filter="data")
            except (tarfile.TarError, EOFError, zlib.error) as exc:
                raise ValueError(f"{archive_path}: truncated or corrupt tar archive "
                                 f"({type(exc).__name__}: {exc})") from exc
            if _find_dataset_root(partial) is None:
                raise ValueError(f"{archive_path}: no dataset.json inside; not a Task07 archive")
            os.replace(partial, destination)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    root = _find_dataset_root(destination)
    assert root is not None
    return root


def _find_dataset_root(folder: Path) -> Path | None:
    """The shallowest folder under ``folder`` (depth <= 2) that contains dataset.json."""
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if (candidate / "dataset.json").is_file():
            return candidate
    return None


def _ends_with_end_of_archive_marker(archive: tarfile.TarFile) -> bool:
    """True if a zero block follows the last member (tar's end-of-archive marker)."""
    archive.fileobj.seek(archive.offset)
    block = archive.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)
