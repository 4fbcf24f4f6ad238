"""Tests of the report figures: structure, saving to PNG, NaN handling, visible overlay colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pancreas_seg.evaluation.plots import (
    LABEL_COLOURS,
    pick_representative_slices,
    plot_dice_boxplots,
    plot_overlays,
    plot_training_curves,
    window_for_display,
)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 1000


def test_training_curves(tmp_path: Path) -> None:
    history = {
        "loss": [1.0, 0.7, 0.5],
        "val_loss": [1.1, 0.8, np.nan],
        "dice_pancreas": [0.1, 0.4, 0.6],
        "val_dice_pancreas": [0.1, 0.3, 0.5],
        "dice_tumour": [0.0, 0.1, 0.2],
        "val_dice_tumour": [0.0, 0.05, 0.1],
        "lr": [1e-3, 1e-3, 5e-4],
    }
    fig = plot_training_curves(history, "unet")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    loss_ax, dice_ax = fig.axes
    assert len(loss_ax.lines) == 2 and len(dice_ax.lines) == 4
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1, 2, 3])
    assert "lr" not in [line.get_label() for line in dice_ax.lines]
    _save(fig, tmp_path / "curves.png")
    only_loss = plot_training_curves({"loss": [1.0]}, "x")
    assert len(only_loss.axes) == 2
    _save(only_loss, tmp_path / "curves_loss_only.png")


def _metrics_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for arch in ("unet", "attention_unet"):
        for case in range(6):
            rows.append({"case_id": f"c{case}", "architecture": arch, "class": "pancreas",
                         "dice": rng.uniform(0.6, 0.9), "hd95_mm": 5.0, "nsd": 0.7})
            tumour = np.nan if case < 2 else rng.uniform(0.0, 0.7)
            rows.append({"case_id": f"c{case}", "architecture": arch, "class": "tumour",
                         "dice": tumour, "hd95_mm": np.inf, "nsd": 0.3})
    rows.append({"case_id": "c0", "architecture": "resunet", "class": "tumour", "dice": np.nan,
                 "hd95_mm": np.nan, "nsd": np.nan})  # an all-NaN box
    return pd.DataFrame(rows)


def test_dice_boxplots(tmp_path: Path) -> None:
    fig = plot_dice_boxplots(_metrics_frame())
    assert isinstance(fig, Figure) and len(fig.axes) == 4  # Dice row, then HD95 row
    pancreas_ax, tumour_ax, pancreas_hd_ax, tumour_hd_ax = fig.axes
    assert "pancreas" in pancreas_ax.get_title() and "tumour" in tumour_ax.get_title()
    labels = [t.get_text() for t in tumour_ax.get_xticklabels()]
    assert labels == ["unet\n(n=4)", "attention_unet\n(n=4)", "resunet\n(n=0)"]
    assert [t.get_text() for t in pancreas_ax.get_xticklabels()][0] == "unet\n(n=6)"
    assert "pancreas HD95" in pancreas_hd_ax.get_title()
    assert "12 misses not drawn" in tumour_hd_ax.get_title()  # every tumour HD95 is inf
    assert [t.get_text() for t in tumour_hd_ax.get_xticklabels()] == [
        "unet\n(n=0, 6 misses)", "attention_unet\n(n=0, 6 misses)", "resunet\n(n=0, 0 misses)"]
    assert "tumour: unet 6 of 6, attention_unet 6 of 6, resunet 0 of 0" in fig.get_supxlabel()
    _save(fig, tmp_path / "box.png")


def _phantom(n_slices: int = 3, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """CT-like slices in HU (body -> soft tissue, air outside) and label slices."""
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 / (0.42 * size) ** 2 + (xx - size / 2) ** 2 / (0.46 * size) ** 2 <= 1
    ct = np.where(body, 40.0, -1000.0)[None].repeat(n_slices, 0)
    ct[:, 8:14, 28:36] = 700.0  # "bone"
    labels = np.zeros((n_slices, size, size), np.uint8)
    labels[:, 30:42, 18:46] = 1
    labels[1:, 33:38, 22:28] = 2
    return ct, labels


def test_overlays(tmp_path: Path) -> None:
    ct, truth = _phantom()
    pred_a = truth.copy()
    pred_b = np.roll(truth, 4, axis=2)
    pred_b[0] = 0  # a missed slice
    fig = plot_overlays(ct, truth, {"unet": pred_a, "resunet": pred_b}, (-160.0, 240.0),
                        ["case 1, z=3", "case 1, z=7", "case 1, z=9"])
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[2] == "unet\npancreas Dice 1.000"
    assert titles[3] == "resunet\npancreas Dice 0.000"
    assert titles[0].startswith("case 1, z=3")
    assert all(not ax.axison for ax in fig.axes)
    gray = fig.axes[0].images[0]
    assert gray.get_clim() == (-160.0, 240.0)
    assert len(fig.legends) == 1
    path = tmp_path / "overlay.png"
    _save(fig, path)

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255
    for colour in LABEL_COLOURS.values():
        # blended with gray at alpha 0.45, the hue still dominates: look for such pixels
        target = np.asarray(colour)
        channel = int(np.argmax(target))
        others = [c for c in range(3) if c != channel and target[c] < 0.5]
        hits = (rgb[..., channel] > 0.5) & np.all(rgb[..., others] < rgb[..., [channel]] - 0.2,
                                                  axis=-1)
        assert hits.sum() > 50


def test_overlays_validation() -> None:
    ct, truth = _phantom()
    with pytest.raises(ValueError, match="titles"):
        plot_overlays(ct, truth, {}, (-160, 240), ["a"])
    with pytest.raises(ValueError, match="shape"):
        plot_overlays(ct, truth, {"x": truth[:2]}, (-160, 240), ["a", "b", "c"])
    fig = plot_overlays(ct[:1], truth[:1], {}, (-160, 240), ["only"])
    assert len(fig.axes) == 2


def test_window_for_display() -> None:
    out = window_for_display(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), (-160, 240))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError):
        window_for_display(np.zeros(2), (10, 10))


def test_pick_representative_slices() -> None:
    labels = np.zeros((8, 8, 40), np.uint8)
    labels[2:5, 2:5, 10:30] = 1
    picks = pick_representative_slices(labels, 4)
    assert len(picks) == 4 and picks == sorted(set(picks))
    assert all(10 <= z < 30 for z in picks)
    assert picks[0] < 15 and picks[-1] > 24  # spread over the extent

    labels[2:5, 2:5, 21] = 2
    picks_t = pick_representative_slices(labels, 4)
    assert 21 in picks_t and len(picks_t) == 4

    assert pick_representative_slices(labels, 100) == list(range(10, 30))
    assert pick_representative_slices(np.swapaxes(labels, 0, 2), 4, axis=0) == picks_t
    empty = np.zeros((4, 4, 9), np.uint8)
    assert pick_representative_slices(empty, 3) == [1, 4, 7]
