"""Safe extraction of Task07 ``.tar`` archives, with real tar files built by ``tarfile``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from pancreas_seg.task07.archive import UnsafeArchiveError, extract_task07_archive
from pancreas_seg.task07.validation import validate_task07


def _tar_of(folder: Path, tar_path: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]] = (),
            junk: bool = False, mode: str = "w") -> Path:
    """Tar ``folder`` as ``Task07_Pancreas/...``, plus ``extra`` hand-made members."""
    with tarfile.open(tar_path, mode) as tar:
        tar.add(folder, arcname="Task07_Pancreas")
        if junk:  # what a tar made on macOS carries
            for name in ("Task07_Pancreas/._dataset.json",
                         "Task07_Pancreas/imagesTr/._pancreas_001.nii.gz",
                         "Task07_Pancreas/labelsTr/._pancreas_001.nii.gz"):
                payload = b"\x00\x05\x16\x07AppleDouble junk"
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        for info, payload in extra:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return tar_path


def _file_member(name: str, payload: bytes = b"evil\n") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def _symlink_member(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_valid_archive_extracts_validates_and_skips_appledouble_members(
        small_task07: Path, tmp_path: Path) -> None:
    tar_path = _tar_of(small_task07, tmp_path / "Task07_Pancreas.tar", junk=True)
    with tarfile.open(tar_path) as tar:
        assert any(Path(m.name).name.startswith("._") for m in tar.getmembers())
    destination = tmp_path / "extracted" / "Task07_Pancreas"
    root = extract_task07_archive(tar_path, destination)
    assert root == destination / "Task07_Pancreas"
    assert (root / "dataset.json").is_file()
    assert [p for p in destination.rglob("._*")] == []
    extracted = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    original = sorted(str(p.relative_to(small_task07)) for p in small_task07.rglob("*"))
    assert extracted == original
    for rel in original:
        if (small_task07 / rel).is_file():
            assert (root / rel).read_bytes() == (small_task07 / rel).read_bytes()
    result = validate_task07(root)
    assert result.findings == [] and len(result.cases) == 5
    # no temporary folder is left next to the destination
    assert _listing(destination.parent) == ["Task07_Pancreas"]


def test_archive_made_from_inside_the_folder_extracts(small_task07: Path, tmp_path: Path) -> None:
    """``tar -cf x.tar -C Task07_Pancreas .`` gives members ``.``, ``./dataset.json``, ..."""
    tar_path = tmp_path / "dot.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(small_task07, arcname=".")
    with tarfile.open(tar_path) as tar:
        assert tar.getnames()[:2] == [".", "./dataset.json"]
    destination = tmp_path / "out"
    root = extract_task07_archive(tar_path, destination)
    assert root == destination and (root / "dataset.json").is_file()
    assert len(validate_task07(root).cases) == 5


def test_existing_extraction_is_reused_untouched(small_task07: Path, tmp_path: Path) -> None:
    tar_path = _tar_of(small_task07, tmp_path / "Task07_Pancreas.tar")
    destination = tmp_path / "out"
    root = extract_task07_archive(tar_path, destination)
    marker = root / "imagesTr" / "pancreas_001.nii.gz"
    mtime = marker.stat().st_mtime_ns
    (root / "NOTE.txt").write_text("added after extraction")
    tar_path.unlink()  # the archive is not even read again
    again = extract_task07_archive(tar_path, destination)
    assert again == root
    assert marker.stat().st_mtime_ns == mtime
    assert (root / "NOTE.txt").read_text() == "added after extraction"
    assert _listing(tmp_path) == ["out"]


def test_existing_destination_without_dataset_json_is_refused(small_task07: Path,
                                                               tmp_path: Path) -> None:
    tar_path = _tar_of(small_task07, tmp_path / "a.tar")
    destination = tmp_path / "out"
    (destination / "something").mkdir(parents=True)
    with pytest.raises(ValueError, match="no dataset.json"):
        extract_task07_archive(tar_path, destination)
    assert _listing(destination) == ["something"]


@pytest.mark.parametrize(("member", "needle"), [
    (_file_member("../evil"), "../evil"),
    (_file_member("Task07_Pancreas/../../evil"), "Task07_Pancreas/../../evil"),
    (_file_member("/tmp/x"), "/tmp/x"),
    (_symlink_member("Task07_Pancreas/passwd", "../../etc/passwd"), "Task07_Pancreas/passwd"),
    (_symlink_member("Task07_Pancreas/abs", "/etc/passwd"), "Task07_Pancreas/abs"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-outside", "symlink-absolute"])
def test_unsafe_member_is_refused_and_nothing_is_extracted(
        small_task07: Path, tmp_path: Path, member, needle: str) -> None:
    tar_path = _tar_of(small_task07, tmp_path / "bad.tar", extra=[member])
    with tarfile.open(tar_path) as tar:
        assert needle in tar.getnames()  # the hostile member really is in the archive
    parent = tmp_path / "data" / "01_raw"
    parent.mkdir(parents=True)
    destination = parent / "Task07_Pancreas"
    with pytest.raises(UnsafeArchiveError) as excinfo:
        extract_task07_archive(tar_path, destination)
    assert needle in str(excinfo.value)
    assert str(tar_path) in str(excinfo.value)
    assert not destination.exists()
    assert _listing(parent) == []  # no partial folder either
    assert not (tmp_path / "evil").exists() and not (tmp_path / "data" / "evil").exists()


def test_every_unsafe_member_is_listed(small_task07: Path, tmp_path: Path) -> None:
    tar_path = _tar_of(small_task07, tmp_path / "bad.tar", extra=[
        _file_member("../evil"), _file_member("/tmp/x"),
        _symlink_member("Task07_Pancreas/link", "../../etc/passwd")])
    with pytest.raises(UnsafeArchiveError) as excinfo:
        extract_task07_archive(tar_path, tmp_path / "out")
    message = str(excinfo.value)
    for name in ("../evil", "/tmp/x", "Task07_Pancreas/link", "../../etc/passwd"):
        assert name in message
    assert not (tmp_path / "out").exists()


def test_symlink_that_stays_inside_is_accepted(small_task07: Path, tmp_path: Path) -> None:
    tar_path = _tar_of(small_task07, tmp_path / "ok.tar", extra=[
        _symlink_member("Task07_Pancreas/imagesTr/latest", "pancreas_001.nii.gz")])
    root = extract_task07_archive(tar_path, tmp_path / "out")
    assert (root / "imagesTr" / "latest").is_symlink()


@pytest.mark.parametrize(("mode", "suffix"), [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_truncated_archive_raises_value_error_and_leaves_nothing(small_task07: Path,
                                                                 tmp_path: Path, mode: str,
                                                                 suffix: str) -> None:
    full = _tar_of(small_task07, tmp_path / f"full{suffix}", mode=mode).read_bytes()
    tar_path = tmp_path / f"Task07_Pancreas{suffix}"
    tar_path.write_bytes(full[: len(full) // 2])  # an interrupted download
    parent = tmp_path / "raw"
    parent.mkdir()
    destination = parent / "Task07_Pancreas"
    with pytest.raises(ValueError) as excinfo:
        extract_task07_archive(tar_path, destination)
    assert str(tar_path) in str(excinfo.value)
    assert not destination.exists()
    assert _listing(parent) == []


def test_archive_truncated_at_a_member_boundary_is_not_taken_as_complete(
        small_task07: Path, tmp_path: Path) -> None:
    """A cut that falls on a member header drops the remaining members without a tar error."""
    full_path = _tar_of(small_task07, tmp_path / "full.tar")
    with tarfile.open(full_path) as tar:
        last_label = [m for m in tar.getmembers() if m.name.startswith("Task07_Pancreas/labelsTr/")
                      and m.isfile()][-1]
    tar_path = tmp_path / "Task07_Pancreas.tar"
    tar_path.write_bytes(full_path.read_bytes()[: last_label.offset])
    parent = tmp_path / "raw"
    parent.mkdir()
    destination = parent / "Task07_Pancreas"
    with pytest.raises(ValueError) as excinfo:
        extract_task07_archive(tar_path, destination)
    assert str(tar_path) in str(excinfo.value)
    assert not destination.exists()
    assert _listing(parent) == []


def test_not_a_tar_raises_value_error(tmp_path: Path) -> None:
    bogus = tmp_path / "Task07_Pancreas.tar"
    bogus.write_bytes(b"definitely not a tar archive" * 100)
    with pytest.raises(ValueError, match="not a readable tar"):
        extract_task07_archive(bogus, tmp_path / "out")
    assert _listing(tmp_path) == ["Task07_Pancreas.tar"]


def test_archive_without_dataset_json_raises_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "imagesTr" / "a.txt").write_text("x")
    tar_path = _tar_of(folder, tmp_path / "x.tar")
    parent = tmp_path / "raw"
    parent.mkdir()
    with pytest.raises(ValueError, match="no dataset.json"):
        extract_task07_archive(tar_path, parent / "Task07_Pancreas")
    assert _listing(parent) == []
