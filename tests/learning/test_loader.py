"""SliceLoader over memory-mapped per-case .npy shards: foreground oversampling, determinism and
resume, complete sequential validation, case-level splits, 2.5D context and target encoding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pancreas_seg.imaging.preprocess import PreprocessingConfig
from pancreas_seg.core.labels import to_training_target
from pancreas_seg.learning.augmentation import AugmentationConfig
from pancreas_seg.learning.loader import SliceLoader
from pancreas_seg.learning.setup import make_loaders, split_cases

SIZE = 16
SLICES_PER_CASE = 40
FOREGROUND_SLICES = (10, 11)  # 2 of 40 slices per case: a natural foreground rate of 5 %
ALWAYS = AugmentationConfig(flip_probability=1.0, spatial_probability=1.0, intensity_probability=1.0)


def _case_arrays(case_index: int, n_slices: int = SLICES_PER_CASE) -> tuple[np.ndarray, np.ndarray]:
    """Image slice z of case c is the constant 1000 c + z (so a batch says which slices it holds);
    labels have pancreas (1) and tumour (2) in FOREGROUND_SLICES only."""
    values = 1000.0 * case_index + np.arange(n_slices, dtype=np.float32)
    image = np.broadcast_to(values[:, None, None], (n_slices, SIZE, SIZE)).astype(np.float32)
    label = np.zeros((n_slices, SIZE, SIZE), np.uint8)
    for z in FOREGROUND_SLICES:
        if z < n_slices:
            label[z, 4:12, 4:12] = 1
            label[z, 6:9, 6:9] = 2
    return image, label


def _save_memmapped(directory: Path, case_id: str, image: np.ndarray,
                    label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    np.save(directory / f"{case_id}_image.npy", image)
    np.save(directory / f"{case_id}_label.npy", label)
    return (np.load(directory / f"{case_id}_image.npy", mmap_mode="r"),
            np.load(directory / f"{case_id}_label.npy", mmap_mode="r"))


@pytest.fixture
def cases(tmp_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four memory-mapped cases, 160 slices, 8 of them with foreground (5 %)."""
    return {f"case_{c}": _save_memmapped(tmp_path, f"case_{c}", *_case_arrays(c)) for c in range(4)}


def _decode(images: np.ndarray) -> list[tuple[int, int]]:
    """(case index, slice index) of each un-augmented batch element (centre channel)."""
    centre = images.shape[-1] // 2
    values = images[:, 0, 0, centre].astype(int)
    assert np.all(images[..., centre] == values[:, None, None]), "slices are constant by construction"
    return [(int(v) // 1000, int(v) % 1000) for v in values]


def _has_foreground(targets: np.ndarray) -> np.ndarray:
    """Per batch element: does the target contain pancreas or tumour?"""
    foreground = targets[..., 1:] if targets.shape[-1] == 3 else targets
    return foreground.reshape(len(targets), -1).max(axis=1) > 0


# --- oversampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1 / 3, 0.5, 0.0])
def test_every_training_batch_has_the_minimum_foreground(cases, fraction: float) -> None:
    batch_size = 6
    loader = SliceLoader(cases, batch_size, "multiclass", training=True, foreground_fraction=fraction,
                         seed=7, steps_per_epoch=20)
    minimum = math.ceil(fraction * batch_size)
    assert loader.n_foreground_per_batch == minimum
    assert loader.foreground_slices.size == 8 and loader.n_slices == 160
    counts = []
    for _ in range(3):
        for index in range(len(loader)):
            images, targets = loader[index]
            assert images.shape == (batch_size, SIZE, SIZE, 1) and images.dtype == np.float32
            assert targets.shape == (batch_size, SIZE, SIZE, 3) and targets.dtype == np.float32
            fg = _has_foreground(targets)
            # The decoded slice identities agree with the targets (no augmentation configured).
            decoded = _decode(images)
            assert [z in FOREGROUND_SLICES for _, z in decoded] == fg.tolist()
            assert fg.sum() >= minimum
            counts.append(fg.sum())
        loader.on_epoch_end()
    rate = np.sum(counts) / (len(counts) * batch_size)
    assert rate >= fraction
    if fraction == 0.0:
        # Nothing forced: the sampled rate stays near the natural 5 % (binomial, 360 draws).
        assert rate < 0.15


def test_oversampling_holds_with_augmentation_and_binary_targets(tmp_path: Path) -> None:
    cases = {}
    for c in range(3):
        image, label = _case_arrays(c)
        cases[f"c{c}"] = _save_memmapped(tmp_path, f"c{c}", image, to_training_target(label, "tumour"))
    loader = SliceLoader(cases, 4, "tumour", training=True, foreground_fraction=0.5, seed=1,
                         steps_per_epoch=10, augmentation=ALWAYS)
    for index in range(len(loader)):
        _, targets = loader[index]
        assert targets.shape == (4, SIZE, SIZE, 1)
        # Rotation/scaling can shrink a lesion but not remove it (it is near the centre).
        assert _has_foreground(targets).sum() >= 2


# --- determinism and resume --------------------------------------------------------------------


def _epoch(loader: SliceLoader) -> list[tuple[np.ndarray, np.ndarray]]:
    return [loader[i] for i in range(len(loader))]


def _same_batches(first, second) -> bool:
    return all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, second, strict=True))


def test_batches_depend_only_on_seed_epoch_and_index(cases) -> None:
    kwargs = {"batch_size": 4, "label_mode": "multiclass", "training": True, "steps_per_epoch": 5,
              "augmentation": AugmentationConfig()}
    first, second = SliceLoader(cases, seed=3, **kwargs), SliceLoader(cases, seed=3, **kwargs)
    other_seed = SliceLoader(cases, seed=4, **kwargs)
    assert _same_batches(_epoch(first), _epoch(second))
    # Random access: batch 3 does not depend on which batches were read before.
    np.testing.assert_array_equal(SliceLoader(cases, seed=3, **kwargs)[3][0], first[3][0])
    assert not _same_batches(_epoch(first), _epoch(other_seed))

    epoch0 = _epoch(first)
    first.on_epoch_end()
    assert first.epoch == 1
    assert not _same_batches(epoch0, _epoch(first))


def test_setting_the_epoch_reproduces_an_uninterrupted_run(cases) -> None:
    kwargs = {"batch_size": 4, "label_mode": "multiclass", "training": True, "steps_per_epoch": 4,
              "augmentation": AugmentationConfig(), "seed": 11}
    uninterrupted = SliceLoader(cases, **kwargs)
    for _ in range(3):  # epochs 0, 1, 2
        _epoch(uninterrupted)
        uninterrupted.on_epoch_end()
    assert uninterrupted.epoch == 3

    resumed = SliceLoader(cases, **kwargs)
    resumed.epoch = 3  # what fit_with_resume does after 3 completed epochs
    assert _same_batches(_epoch(uninterrupted), _epoch(resumed))


# --- validation mode ---------------------------------------------------------------------------


def test_validation_is_sequential_complete_and_never_augmented(tmp_path: Path) -> None:
    sizes = {"a": 7, "b": 5, "c": 9}  # 21 slices: the last batch of 4 holds one slice
    cases = {cid: _save_memmapped(tmp_path, cid, *_case_arrays(i, n)) for i, (cid, n) in enumerate(sizes.items())}
    loader = SliceLoader(cases, 4, "multiclass", training=False, augmentation=ALWAYS,
                         foreground_fraction=1.0, steps_per_epoch=2, seed=5)
    assert len(loader) == math.ceil(21 / 4) == 6
    assert loader.n_foreground_per_batch == 0

    def read_all() -> tuple[list[tuple[int, int]], list[np.ndarray]]:
        seen, targets = [], []
        for index in range(len(loader)):
            images, target = loader[index]
            seen += _decode(images)
            targets.append(target)
        return seen, targets

    seen, targets = read_all()
    assert [len(t) for t in targets] == [4, 4, 4, 4, 4, 1]
    expected = [(i, z) for i, n in enumerate(sizes.values()) for z in range(n)]
    assert seen == expected  # every slice exactly once, in case then slice order
    labels = np.concatenate([cases[cid][1] for cid in sorted(cases)])
    np.testing.assert_array_equal(np.concatenate(targets).argmax(axis=-1), labels)  # un-augmented
    loader.on_epoch_end()
    assert read_all()[0] == expected  # the same every epoch
    with pytest.raises(IndexError):
        loader[len(loader)]


def test_training_default_length_is_one_pass(cases) -> None:
    loader = SliceLoader(cases, 16, "multiclass", training=True)
    assert len(loader) == math.ceil(160 / 16)


# --- splits ------------------------------------------------------------------------------------


def test_train_and_validation_loaders_hold_disjoint_cases_from_the_manifest(tmp_path: Path) -> None:
    manifest = pd.DataFrame({
        "case_id": [f"pancreas_{i:03d}" for i in range(6)],
        "split": ["train", "validation", "train", "test", "train", "validation"],
        "source": "synthetic",
    })
    shards = {}
    for i, case_id in enumerate(manifest["case_id"]):
        image, label = _case_arrays(i, 6)
        np.save(tmp_path / f"{case_id}_image.npy", image)
        np.save(tmp_path / f"{case_id}_label.npy", label)
        for kind in ("image", "label"):
            path = tmp_path / f"{case_id}_{kind}.npy"
            shards[f"{case_id}/{kind}"] = lambda path=path: np.load(path, mmap_mode="r")

    train_cases = split_cases(shards, manifest, "train")
    assert isinstance(train_cases["pancreas_000"][0], np.memmap)
    settings = {"batch_size": 4, "seed": 0, "foreground_fraction": 0.5, "steps_per_epoch": 3,
                "augmentation": {"enabled": False}}
    train, validation = make_loaders(shards, manifest, settings, PreprocessingConfig(image_size_px=(SIZE, SIZE)))
    assert train.case_ids == ["pancreas_000", "pancreas_002", "pancreas_004"] == sorted(train_cases)
    assert validation.case_ids == ["pancreas_001", "pancreas_005"]
    assert set(train.case_ids).isdisjoint(validation.case_ids)
    assert train.training and not validation.training
    # The slices served come from the split's cases only (case index is encoded in the image).
    served = {c for i in range(len(validation)) for c, _ in _decode(validation[i][0])}
    assert served == {1, 5}
    served = {c for i in range(len(train)) for c, _ in _decode(train[i][0])}
    assert served <= {0, 2, 4}

    with pytest.raises(ValueError, match="pancreas_009"):
        split_cases(shards, pd.concat([manifest, pd.DataFrame(
            {"case_id": ["pancreas_009"], "split": ["train"], "source": ["synthetic"]})]), "train")


# --- 2.5D context and targets ------------------------------------------------------------------


def test_context_slices_stack_clamped_neighbours(tmp_path: Path) -> None:
    cases = {"a": _save_memmapped(tmp_path, "a", *_case_arrays(2, 5))}
    loader = SliceLoader(cases, 5, "multiclass", training=False, context_slices=3)
    images, targets = loader[0]
    assert images.shape == (5, SIZE, SIZE, 3) and targets.shape == (5, SIZE, SIZE, 3)
    expected = np.array([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]) + 2000.0
    np.testing.assert_array_equal(images[:, 0, 0, :], expected)
    loader5 = SliceLoader(cases, 5, "multiclass", training=False, context_slices=5)
    np.testing.assert_array_equal(loader5[0][0][0, 0, 0, :], [2000, 2000, 2000, 2001, 2002])


@pytest.mark.parametrize("label_mode", ["multiclass", "pancreas", "tumour"])
def test_targets_are_encoded_for_the_label_mode(tmp_path: Path, label_mode: str) -> None:
    image, label = _case_arrays(0, 12)
    mapped = to_training_target(label, label_mode)
    cases = {"a": _save_memmapped(tmp_path, "a", image, mapped)}
    loader = SliceLoader(cases, 12, label_mode, training=False)
    _, targets = loader[0]
    assert targets.dtype == np.float32
    assert set(np.unique(targets)) == {0.0, 1.0}
    if label_mode == "multiclass":
        assert targets.shape == (12, SIZE, SIZE, 3)
        np.testing.assert_array_equal(targets.sum(axis=-1), 1.0)
        np.testing.assert_array_equal(targets.argmax(axis=-1), label)
    else:
        assert targets.shape == (12, SIZE, SIZE, 1)
        truth = label >= 1 if label_mode == "pancreas" else label == 2
        np.testing.assert_array_equal(targets[..., 0], truth)


# --- errors and memory -------------------------------------------------------------------------


def test_invalid_inputs_raise_value_error(tmp_path: Path) -> None:
    image, label = _case_arrays(0, 6)
    with pytest.raises(ValueError, match="shape"):
        SliceLoader({"a": (image, label[:5])}, 2, "multiclass", training=True)
    with pytest.raises(ValueError, match="at least one case"):
        SliceLoader({}, 2, "multiclass", training=True)
    with pytest.raises(ValueError):  # a case without slices
        SliceLoader({"a": (image[:0], label[:0])}, 2, "multiclass", training=False)
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match="foreground_fraction"):
            SliceLoader({"a": (image, label)}, 2, "multiclass", training=True, foreground_fraction=fraction)


def test_loader_keeps_memmaps_and_reads_slices_on_demand(cases) -> None:
    loader = SliceLoader(cases, 4, "multiclass", training=True, steps_per_epoch=2)
    assert all(isinstance(a, np.memmap) for a in loader._images + loader._labels)
    images, targets = loader[0]
    # Batches are ordinary in-memory arrays, detached from the files.
    assert not isinstance(images, np.memmap) and not isinstance(targets, np.memmap)
    assert images.nbytes == 4 * SIZE * SIZE * 4
