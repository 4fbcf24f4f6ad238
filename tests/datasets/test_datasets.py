"""Tests of the project's Kedro datasets (NiftiDataset, NumpyDataset, FigureDataset) on real files, no mocks.

KerasModelDataset is covered by the model tests.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import pytest
from kedro.io.core import DatasetError, Version
from kedro_datasets.partitions import PartitionedDataset

from pancreas_seg.core.atomic import atomic_path, atomic_write_bytes
from pancreas_seg.datasets import FigureDataset, NiftiDataset, NumpyDataset
from pancreas_seg.imaging.nifti_io import NiftiVolume, orientation_code


def _rotated_flipped_affine() -> np.ndarray:
    """A non-trivial affine: 20 deg rotation about z, a flipped x axis, anisotropic voxels, origin.

    NIfTI stores the sform as float32, so the values are made float32-representable first; a
    round trip can then be required to be bit-exact.
    """
    angle = np.deg2rad(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                    [np.sin(angle), np.cos(angle), 0.0],
                    [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.75, 0.8, 2.5])
    affine[:3, 3] = [123.25, -87.5, -310.125]
    return affine.astype(np.float32).astype(np.float64)


def _volumes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (7, 6, 5)
    hu = rng.integers(-1024, 3072, size=shape).astype(np.int16)
    hu.flat[0], hu.flat[1] = -32768, 32767  # int16 extremes must survive (no scaling)
    label = rng.integers(0, 3, size=shape).astype(np.uint8)
    prob = rng.standard_normal(shape).astype(np.float32)
    return {"int16": hu, "uint8": label, "float32": prob}


def _no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ NIfTI
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("kind", ["int16", "uint8", "float32"])
def test_nifti_round_trip_keeps_data_dtype_and_affine_exactly(tmp_path: Path, suffix: str,
                                                              kind: str) -> None:
    array, affine = _volumes()[kind], _rotated_flipped_affine()
    assert orientation_code(affine)[0] in "LR" and orientation_code(affine) != "RAS"
    path = tmp_path / f"volume{suffix}"
    dataset = NiftiDataset(filepath=str(path))
    assert not dataset.exists()
    dataset.save(NiftiVolume(array, affine))
    assert dataset.exists()
    assert _no_temp_files(tmp_path) == []

    loaded = dataset.load()
    assert isinstance(loaded, NiftiVolume)
    assert loaded.array.dtype == array.dtype
    assert loaded.array.shape == array.shape
    assert np.array_equal(loaded.array, array)
    assert loaded.affine.dtype == np.float64
    assert np.array_equal(loaded.affine, affine)
    # compressed iff the path ends in .gz
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == suffix.endswith(".gz")
    # an independent reader agrees
    image = nib.load(str(path))
    assert np.array_equal(np.asanyarray(image.dataobj), array)
    assert np.array_equal(image.affine, affine)


def test_nifti_affine_that_is_not_float32_representable_round_trips_to_float32_precision(
        tmp_path: Path) -> None:
    affine = np.array([[0.7071067811865476, -0.7071067811865476, 0.0, 100.123456789],
                       [0.7071067811865476, 0.7071067811865476, 0.0, -50.987654321],
                       [0.0, 0.0, 3.3333333333, 12.3456789],
                       [0.0, 0.0, 0.0, 1.0]])
    dataset = NiftiDataset(filepath=str(tmp_path / "v.nii.gz"))
    dataset.save(NiftiVolume(np.zeros((3, 3, 3), np.int16), affine))
    np.testing.assert_allclose(dataset.load().affine, affine, rtol=0, atol=1e-4)


def test_nifti_save_accepts_array_affine_tuple(tmp_path: Path) -> None:
    array = _volumes()["uint8"]
    affine = _rotated_flipped_affine()
    dataset = NiftiDataset(filepath=str(tmp_path / "sub" / "label.nii.gz"))
    dataset.save((array, affine))  # the parent folder is created
    loaded = dataset.load()
    assert np.array_equal(loaded.array, array) and loaded.array.dtype == np.uint8
    assert np.array_equal(loaded.affine, affine)


def test_nifti_save_overwrites_atomically_and_failed_save_keeps_previous_file(
        tmp_path: Path) -> None:
    path = tmp_path / "v.nii.gz"
    dataset = NiftiDataset(filepath=str(path))
    first = _volumes()["int16"]
    dataset.save((first, np.eye(4)))
    second = first[::-1].copy()
    dataset.save((second, np.eye(4)))
    assert np.array_equal(dataset.load().array, second)
    before = path.read_bytes()
    with pytest.raises(DatasetError):
        dataset.save((np.zeros((2, 2, 2)), np.eye(3)))  # not a 4x4 affine: nibabel refuses
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path) == []


def test_versioned_nifti_saves_each_version_and_loads_the_latest(tmp_path: Path) -> None:
    path = tmp_path / "pred" / "case.nii.gz"
    affine = _rotated_flipped_affine()
    unversioned_view = NiftiDataset(filepath=str(path), version=Version(None, None))
    assert not unversioned_view.exists()  # no version yet

    first = NiftiDataset(filepath=str(path), version=Version(None, None))
    first.save((np.full((3, 3, 3), 1, np.uint8), affine))
    time.sleep(0.01)  # versions are millisecond timestamps
    second = NiftiDataset(filepath=str(path), version=Version(None, None))
    second.save((np.full((3, 3, 3), 2, np.uint8), affine))

    versions = sorted(p.name for p in path.iterdir())
    assert len(versions) == 2
    assert all((path / v / "case.nii.gz").is_file() for v in versions)

    latest = NiftiDataset(filepath=str(path), version=Version(None, None))
    assert latest.exists()
    loaded = latest.load()
    assert np.all(loaded.array == 2) and np.array_equal(loaded.affine, affine)
    pinned = NiftiDataset(filepath=str(path), version=Version(versions[0], None))
    assert np.all(pinned.load().array == 1)
    assert _no_temp_files(tmp_path) == []


def test_nifti_load_args_dtype_converts_hu(tmp_path: Path) -> None:
    hu = _volumes()["int16"]
    path = tmp_path / "ct.nii.gz"
    NiftiDataset(filepath=str(path)).save((hu, np.eye(4)))
    loaded = NiftiDataset(filepath=str(path), load_args={"dtype": "float32"}).load()
    assert loaded.array.dtype == np.float32
    assert np.array_equal(loaded.array, hu.astype(np.float32))


def test_nifti_exists_semantics(tmp_path: Path) -> None:
    path = tmp_path / "a.nii.gz"
    dataset = NiftiDataset(filepath=str(path))
    assert dataset.exists() is False
    dataset.save((np.zeros((2, 2, 2), np.uint8), np.eye(4)))
    assert dataset.exists() is True
    path.unlink()
    assert dataset.exists() is False


def test_partitioned_nifti_dataset_saves_lazily_and_loads_back(tmp_path: Path) -> None:
    folder = tmp_path / "predictions"
    partitioned = PartitionedDataset(path=str(folder), dataset=NiftiDataset,
                                     filename_suffix=".nii.gz")
    affine = _rotated_flipped_affine()
    calls: list[str] = []

    def make(case_id: str, value: int):
        def build() -> tuple[np.ndarray, np.ndarray]:
            calls.append(case_id)
            return np.full((4, 3, 2), value, np.uint8), affine
        return build

    partitions = {"pancreas_001": make("pancreas_001", 1), "pancreas_002": make("pancreas_002", 2)}
    assert calls == []  # nothing computed while building the dict
    partitioned.save(partitions)
    assert sorted(calls) == ["pancreas_001", "pancreas_002"]
    assert sorted(p.name for p in folder.iterdir()) == ["pancreas_001.nii.gz",
                                                         "pancreas_002.nii.gz"]
    loaded = partitioned.load()
    assert sorted(loaded) == ["pancreas_001", "pancreas_002"]
    assert all(callable(v) for v in loaded.values())
    for value, case_id in ((1, "pancreas_001"), (2, "pancreas_002")):
        volume = loaded[case_id]()
        assert isinstance(volume, NiftiVolume)
        assert volume.array.dtype == np.uint8 and np.all(volume.array == value)
        assert np.array_equal(volume.affine, affine)
    assert _no_temp_files(tmp_path) == []


# ------------------------------------------------------------------------------------ NumPy
def test_partitioned_numpy_dataset_as_in_the_catalog(tmp_path: Path) -> None:
    """model_input_slices: <case>/image.npy + <case>/label.npy, memory-mapped, overwrite."""
    folder = tmp_path / "slices"
    partitioned = PartitionedDataset(
        path=str(folder), filename_suffix=".npy", overwrite=True,
        dataset={"type": "pancreas_seg.datasets.NumpyDataset", "load_args": {"mmap_mode": "r"}})
    image = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
    label = (image > 0.5).astype(np.uint8)
    partitioned.save({"case_a/image": lambda: image, "case_a/label": lambda: label,
                      "case_b/image": image[:2], "case_b/label": label[:2]})
    assert sorted(p.name for p in (folder / "case_a").iterdir()) == ["image.npy", "label.npy"]
    loaded = partitioned.load()
    assert sorted(loaded) == ["case_a/image", "case_a/label", "case_b/image", "case_b/label"]
    mapped = loaded["case_a/image"]()
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, image)
    assert loaded["case_b/label"]().dtype == np.uint8
    # overwrite: a second save without case_b drops its shards
    partitioned.save({"case_a/image": image, "case_a/label": label})
    assert sorted(p.name for p in folder.iterdir()) == ["case_a"]
    assert _no_temp_files(tmp_path) == []



@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8", "int16"])
def test_numpy_round_trip_keeps_dtype_and_shape(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((5, 8, 6)) * 50).astype(dtype)
    dataset = NumpyDataset(filepath=str(tmp_path / "x" / "image.npy"))
    assert not dataset.exists()
    dataset.save(array)
    assert dataset.exists()
    loaded = dataset.load()
    assert loaded.dtype == np.dtype(dtype) and loaded.shape == (5, 8, 6)
    assert np.array_equal(loaded, array)
    assert not isinstance(loaded, np.memmap)
    assert _no_temp_files(tmp_path) == []


def test_numpy_saves_non_contiguous_arrays_in_logical_order(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5).transpose(2, 0, 1)[::-1]
    dataset = NumpyDataset(filepath=str(tmp_path / "t.npy"))
    dataset.save(array)
    assert np.array_equal(dataset.load(), array)


def test_numpy_mmap_mode_returns_read_only_memmap(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "image.npy"
    NumpyDataset(filepath=str(path)).save(array)
    loaded = NumpyDataset(filepath=str(path), load_args={"mmap_mode": "r"}).load()
    assert isinstance(loaded, np.memmap)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, array)
    with pytest.raises(ValueError):
        loaded[0, 0, 0] = 1.0  # read-only


def test_numpy_failed_save_leaves_previous_file_intact_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "label.npy"
    dataset = NumpyDataset(filepath=str(path))
    dataset.save(np.ones((2, 2), np.uint8))
    before = path.read_bytes()
    with pytest.raises(DatasetError, match="pickle"):
        dataset.save(np.array([{"a": 1}, None], dtype=object))  # np.save refuses with allow_pickle=False
    assert path.read_bytes() == before
    assert np.array_equal(dataset.load(), np.ones((2, 2), np.uint8))
    assert _no_temp_files(tmp_path) == []


def test_atomic_write_failing_mid_write_removes_temp_and_keeps_target(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old content")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "a str is not bytes")  # fails after the temp file is created
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ------------------------------------------------------------------ remote (fsspec memory://)
@pytest.fixture
def memory_root():
    # Kedro keeps the netloc ("bucket") only for cloud protocols, so memory:// paths are written
    # with an empty netloc (three slashes) to name exactly the file that is stored.
    root = f"memory:///pancreas-seg-tests/{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_nifti_dataset_on_memory_filesystem(memory_root: str) -> None:
    array, affine = _volumes()["int16"], _rotated_flipped_affine()
    for suffix in (".nii.gz", ".nii"):
        dataset = NiftiDataset(filepath=f"{memory_root}/ct{suffix}")
        assert dataset._protocol == "memory"  # the remote code path, not the local one
        assert not dataset.exists()
        dataset.save((array, affine))
        assert dataset.exists()
        payload = fsspec.filesystem("memory").cat(f"{memory_root}/ct{suffix}")
        assert (payload[:2] == b"\x1f\x8b") == suffix.endswith(".gz")
        loaded = dataset.load()
        assert loaded.array.dtype == np.int16 and np.array_equal(loaded.array, array)
        assert np.array_equal(loaded.affine, affine)


def test_nifti_load_args_apply_on_memory_filesystem_too(memory_root: str) -> None:
    """The same catalog entry must give the same dtype whether the file is local or remote."""
    hu = _volumes()["int16"]
    NiftiDataset(filepath=f"{memory_root}/ct.nii.gz").save((hu, np.eye(4)))
    loaded = NiftiDataset(filepath=f"{memory_root}/ct.nii.gz",
                          load_args={"dtype": "float32"}).load()
    assert loaded.array.dtype == np.float32
    assert np.array_equal(loaded.array, hu.astype(np.float32))


def test_versioned_nifti_dataset_on_memory_filesystem(memory_root: str) -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    NiftiDataset(filepath=f"{memory_root}/m.nii.gz", version=Version(None, None)).save(
        (np.full((2, 2, 2), 5, np.uint8), affine))
    loaded = NiftiDataset(filepath=f"{memory_root}/m.nii.gz", version=Version(None, None)).load()
    assert np.all(loaded.array == 5) and np.array_equal(loaded.affine, affine)


def test_numpy_dataset_on_memory_filesystem(memory_root: str) -> None:
    array = np.arange(30, dtype=np.float16).reshape(2, 3, 5)
    dataset = NumpyDataset(filepath=f"{memory_root}/slices/image.npy")
    assert dataset._protocol == "memory"
    assert not dataset.exists()
    dataset.save(array)
    assert dataset.exists()
    loaded = dataset.load()
    assert loaded.dtype == np.float16 and np.array_equal(loaded, array)


# ---- FigureDataset ----

def _figure(width_in: float = 3.0) -> Any:
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(width_in, 2.0))
    figure.add_subplot().plot([0, 1, 2], [0, 1, 4])
    return figure


def _png_size(payload: bytes) -> tuple[int, int]:
    assert payload[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(payload[16:20], "big"), int.from_bytes(payload[20:24], "big")


def test_figure_dataset_writes_the_image_with_its_save_args_and_previews_it(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "curves.png"
    FigureDataset(filepath=str(path), save_args={"dpi": 50}).save(_figure())
    assert _png_size(path.read_bytes()) == (150, 100)          # 3 x 2 in at 50 dpi
    FigureDataset(filepath=str(path), save_args={"dpi": 100}).save(_figure())
    assert _png_size(path.read_bytes()) == (300, 200)
    assert sorted(p.name for p in path.parent.iterdir()) == ["curves.png"]    # no temporary files left
    dataset = FigureDataset(filepath=str(path))
    assert dataset.exists()
    assert base64.b64decode(dataset.preview()) == path.read_bytes()
    # the format follows the suffix
    svg = tmp_path / "curves.svg"
    FigureDataset(filepath=str(svg)).save(_figure())
    assert b"<svg" in svg.read_bytes()[:2000]


def test_figure_dataset_errors_name_the_file_and_a_failed_save_keeps_the_previous_image(tmp_path: Path) -> None:
    path = tmp_path / "boxplots.png"
    FigureDataset(filepath=str(path)).save(_figure())
    before = path.read_bytes()
    with pytest.raises(DatasetError, match=r"boxplots\.png: expected a matplotlib Figure to save, got dict"):
        FigureDataset(filepath=str(path)).save({"not": "a figure"})
    with pytest.raises(DatasetError, match=r"boxplots\.png.*(?i:format)"):   # matplotlib rejects the format
        FigureDataset(filepath=str(path), save_args={"format": "no-such-format"}).save(_figure())
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["boxplots.png"]
    with pytest.raises(DatasetError, match=r"boxplots\.png: FigureDataset only saves figures"):
        FigureDataset(filepath=str(path)).load()


def test_versioned_figure_dataset_keeps_every_version(tmp_path: Path) -> None:
    path = tmp_path / "overlay.png"
    for save_version in ("2026-12-04T10.00.00.000Z", "2026-12-04T11.00.00.000Z"):
        FigureDataset(filepath=str(path), version=Version(None, save_version)).save(_figure())
    assert sorted(p.name for p in path.iterdir()) == ["2026-12-04T10.00.00.000Z", "2026-12-04T11.00.00.000Z"]
    assert all(_png_size((v / "overlay.png").read_bytes()) for v in path.iterdir())


@pytest.mark.subprocess
def test_declaring_figure_datasets_does_not_import_matplotlib() -> None:
    """kedro-mlflow builds every catalog entry when a run starts; plots cost nothing until saved."""
    code = ("import sys; from kedro.io import AbstractDataset; "
            "AbstractDataset.from_config('plot', {'type': 'pancreas_seg.datasets.FigureDataset', "
            "'filepath': 'data/08_reporting/x.png', 'save_args': {'dpi': 110}}); "
            "print('matplotlib' in sys.modules)")
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                             check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip().splitlines()[-1] == "False"


def test_every_plot_in_the_catalogs_is_written_atomically() -> None:
    conf = Path(__file__).resolve().parents[2] / "conf"
    text = "\n".join(path.read_text() for path in sorted(conf.rglob("catalog*.yml")))
    assert "pancreas_seg.datasets.FigureDataset" in text
    assert "matplotlib.MatplotlibDataset" not in text   # Kedro's writes the file in place


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """Not mkstemp's owner-only 0600: shared outputs stay readable as any other file the run writes."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777
    atomic_write_bytes(tmp_path / "atomic.bin", b"x")
    with atomic_path(tmp_path / "model.keras") as tmp:
        tmp.write_bytes(b"x")
    NumpyDataset(filepath=str(tmp_path / "array.npy")).save(np.zeros(3))
    FigureDataset(filepath=str(tmp_path / "figure.png")).save(_figure())
    for name in ("atomic.bin", "model.keras", "array.npy", "figure.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
