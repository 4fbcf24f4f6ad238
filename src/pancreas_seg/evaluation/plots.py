"""Report figures: training and learning curves, Dice and HD95 box plots, CT overlays (Matplotlib, no pyplot state).

Every ``plot_*`` function builds a :class:`matplotlib.figure.Figure` directly (no ``pyplot``
global state, no GUI backend) and returns it; the caller saves it (``fig.savefig(path)``, or the
catalog's :class:`pancreas_seg.datasets.FigureDataset`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pancreas_seg.core.labels import CLASS_LABELS, LABEL_NAMES, PANCREAS, TUMOUR, class_mask
from pancreas_seg.learning.curves import SECONDS_KEY, STEP_KEY, curve

from .metrics import dice

if TYPE_CHECKING:
    import pandas as pd

LABEL_COLOURS: dict[int, tuple[float, float, float]] = {
    PANCREAS: (0.10, 0.85, 0.25),  # green
    TUMOUR: (0.95, 0.10, 0.60),    # magenta
}
"""RGB colour per label value in overlays."""
OVERLAY_ALPHA = 0.45


# --------------------------------------------------------------------------- training curves
def _is_dice_key(key: str) -> bool:
    """True for Keras history keys of Dice metrics (``dice_*``, ``val_dice_*``, ``dice``)."""
    return key.startswith(("dice_", "val_dice_")) or key in ("dice", "val_dice")


def plot_training_curves(history: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Loss and Dice curves of one training run.

    Args:
        history: Keras-style history, metric name -> one value per epoch; uses ``loss`` and
            ``val_loss`` (left panel) and every ``dice_*`` / ``val_dice_*`` key (right panel).
            Missing keys are skipped; NaN values show as gaps.
        title: figure title (e.g. the architecture).

    Returns:
        A Figure with 2 axes; x is the epoch number, starting at 1.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_dice = fig.subplots(1, 2)
    for key, style in (("loss", "-"), ("val_loss", "--")):
        values = history.get(key)
        if values is not None and len(values):
            epochs = np.arange(1, len(values) + 1)
            ax_loss.plot(epochs, np.asarray(values, dtype=float), style, marker=".", label=key)
    ax_loss.set(title="loss", xlabel="epoch", ylabel="loss")

    train_keys = sorted(k for k in history if _is_dice_key(k) and not k.startswith("val_"))
    val_keys = sorted(k for k in history if _is_dice_key(k) and k.startswith("val_"))
    colours: dict[str, str] = {}
    for index, key in enumerate(train_keys):
        colours[key] = f"C{index % 10}"
    for key in train_keys + val_keys:
        values = history[key]
        if not len(values):
            continue
        base = key.removeprefix("val_")
        colour = colours.setdefault(base, f"C{len(colours) % 10}")
        epochs = np.arange(1, len(values) + 1)
        ax_dice.plot(epochs, np.asarray(values, dtype=float), "--" if key.startswith("val_") else "-",
                     color=colour, marker=".", label=key)
    ax_dice.set(title="Dice", xlabel="epoch", ylabel="Dice", ylim=(0.0, 1.0))
    if not (train_keys or val_keys):
        ax_dice.text(0.5, 0.5, "no Dice metrics in history", ha="center", va="center",
                     transform=ax_dice.transAxes)
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- Dice / HD95 box plots
def plot_learning_curves(histories: Mapping[str, Mapping[str, Sequence[float]]],
                         metric: str = "val_dice_pancreas", labels: Mapping[str, str] | None = None) -> Figure:
    """``metric`` of every model against optimizer steps (left) and training seconds (right).

    Args:
        histories: model name -> its training history (one value per epoch, with the
            :mod:`pancreas_seg.learning.curves` keys ``optimizer_step`` and ``training_seconds``).
        metric: the history key on the y-axis (a validation Dice).
        labels: optional legend text per model (e.g. where its Dice is measured); default the name.

    Returns:
        A Figure with 2 axes and, on each, one line per model that has the metric and the x-axis
        key (same colour in both panels); the models without them are named under the figure.
    """
    labels = dict(labels or {})
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_step, ax_seconds = fig.subplots(1, 2, sharey=True)
    missing: list[str] = []
    for index, (name, history) in enumerate(histories.items()):
        drawn = False
        for ax, x_key in ((ax_step, STEP_KEY), (ax_seconds, SECONDS_KEY)):
            x, y = curve(history, metric, x_key)
            if x.size:
                ax.plot(x, y, marker=".", color=f"C{index % 10}", label=labels.get(name, name))
                drawn = True
        if not drawn:
            missing.append(name)
    ax_step.set(title=f"{metric} against optimizer steps", xlabel="optimizer steps", ylabel=metric,
                ylim=(0.0, 1.0))
    ax_seconds.set(title=f"{metric} against training time", xlabel="seconds in fit (training + validation)")
    for ax in (ax_step, ax_seconds):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0.0)
    handles, names = ax_step.get_legend_handles_labels()
    if handles:  # one legend for both panels (a model has the same colour in each), beside them
        fig.legend(handles, names, loc="outside right upper", fontsize="small")
    if missing:
        fig.supxlabel(f"no {metric} / step record: {', '.join(missing)}", fontsize="small")
    fig.suptitle("Learning curves: one line per model, a point per epoch")
    return fig


def _plural(count: int, word: str, plural: str) -> str:
    return f"{count} {word if count == 1 else plural}"


def _ordered(values: pd.Series, known: Sequence[str] = ()) -> list[str]:
    """Distinct values in first-seen order, the ``known`` ones first (in that order)."""
    seen = list(dict.fromkeys(values.tolist()))
    return [v for v in known if v in seen] + [v for v in seen if v not in known]


def hd95_counts(metrics: pd.DataFrame, column: str = "hd95_mm") -> dict[tuple[str, str], dict[str, int]]:
    """Per (class, architecture): ``{"n_finite", "n_inf", "n_nan"}`` of an HD95 column.

    ``n_inf`` counts misses (exactly one of prediction and truth empty), ``n_nan`` the cases where
    both are empty (HD95 undefined). Classes in :data:`CLASS_LABELS` order, then first-seen order.
    """
    counts = {}
    for class_name in _ordered(metrics["class"], list(CLASS_LABELS)):
        for arch in _ordered(metrics["architecture"]):
            rows = metrics[(metrics["class"] == class_name) & (metrics["architecture"] == arch)]
            values = rows[column].to_numpy(dtype=float)
            counts[(class_name, arch)] = {"n_finite": int(np.count_nonzero(np.isfinite(values))),
                                          "n_inf": int(np.count_nonzero(np.isinf(values))),
                                          "n_nan": int(np.count_nonzero(np.isnan(values)))}
    return counts


def hd95_miss_caption(metrics: pd.DataFrame, column: str = "hd95_mm") -> str:
    """Caption for HD95 plots: the misses (``inf``) and undefined cases (NaN) per class and model.

    E.g. ``"HD95 boxes show finite cases only. Misses (HD95 = inf: one of prediction and truth
    empty), not drawn: pancreas: unet 1 of 6, fcn 0 of 6; tumour: ... Both empty (HD95
    undefined, excluded): tumour: unet 2, fcn 2."``
    """
    counts = hd95_counts(metrics, column)
    classes = list(dict.fromkeys(c for c, _ in counts))
    misses = "; ".join(
        f"{c}: " + ", ".join(f"{a} {n['n_inf']} of {n['n_inf'] + n['n_finite']}"
                             for (c2, a), n in counts.items() if c2 == c)
        for c in classes)
    caption = ("HD95 boxes show finite cases only. Misses (HD95 = inf: one of prediction and truth empty), "
               f"not drawn: {misses or 'none'}.")
    undefined = "; ".join(
        f"{c}: " + ", ".join(f"{a} {n['n_nan']}" for (c2, a), n in counts.items() if c2 == c)
        for c in classes if any(n["n_nan"] for (c2, _), n in counts.items() if c2 == c))
    if undefined:
        caption += f" Both empty (HD95 undefined, excluded): {undefined}."
    return caption


def plot_dice_boxplots(metrics: pd.DataFrame, hd95_column: str = "hd95_mm") -> Figure:
    """Box plots of per-case 3D Dice (top row) and HD95 (bottom row) per architecture and class.

    Args:
        metrics: one row per case x architecture x class with columns
            ``case_id, architecture, class, dice`` and ``hd95_column``. Rows whose Dice is NaN
            (both masks empty) are left out of the Dice boxes; each Dice box's x label gives its
            number of cases ``n``. HD95 boxes hold the finite values only: each HD95 x label gives
            ``n`` finite cases and the number of misses (``inf``), and the figure caption
            (:func:`hd95_miss_caption`, ``fig.get_supxlabel()``) lists the misses and the both-empty
            cases per class and architecture, so a model that misses a structure does not look
            better than one that finds it badly.
        hd95_column: which HD95 column to plot (``hd95_mm`` or ``hd95_mm_lcc``).

    Returns:
        A Figure with 2 rows x one column per class (known classes first, in
        :data:`CLASS_LABELS` order); ``fig.axes`` is the Dice row, then the HD95 row.
    """
    classes = _ordered(metrics["class"], list(CLASS_LABELS))
    architectures = _ordered(metrics["architecture"])
    fig = Figure(figsize=(max(4.0, 1.6 * len(architectures) + 1.5) * max(len(classes), 1), 9.0),
                 layout="constrained")
    axes = fig.subplots(2, max(len(classes), 1), squeeze=False)
    if not classes:
        axes[0, 0].text(0.5, 0.5, "no metrics", ha="center", va="center", transform=axes[0, 0].transAxes)
        return fig
    counts = hd95_counts(metrics, hd95_column)
    rng = np.random.default_rng(0)
    positions = np.arange(1, len(architectures) + 1)
    for col, class_name in enumerate(classes):
        dice_data, dice_labels, hd_data, hd_labels = [], [], [], []
        for arch in architectures:
            rows = metrics[(metrics["class"] == class_name) & (metrics["architecture"] == arch)]
            values = rows["dice"].to_numpy(dtype=float)
            dice_data.append(values[np.isfinite(values)])
            dice_labels.append(f"{arch}\n(n={dice_data[-1].size})")
            values = rows[hd95_column].to_numpy(dtype=float)
            hd_data.append(values[np.isfinite(values)])
            n_inf = counts[(class_name, arch)]["n_inf"]
            hd_labels.append(f"{arch}\n(n={hd_data[-1].size}, {_plural(n_inf, 'miss', 'misses')})")
        for ax, data, labels in ((axes[0, col], dice_data, dice_labels), (axes[1, col], hd_data, hd_labels)):
            ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
            for pos, values in zip(positions, data, strict=True):
                if values.size:
                    jitter = rng.uniform(-0.12, 0.12, size=values.size)
                    ax.plot(pos + jitter, values, "o", markersize=3, alpha=0.6, color="C0")
            ax.set_xticks(positions)
            ax.set_xticklabels(labels)
            ax.grid(axis="y", alpha=0.3)
        axes[0, col].set(title=f"{class_name} Dice (3D, per case)", ylabel="Dice", ylim=(-0.02, 1.02))
        n_misses = sum(counts[(class_name, a)]["n_inf"] for a in architectures)
        axes[1, col].set(title=f"{class_name} HD95 (finite cases; {_plural(n_misses, 'miss', 'misses')} not drawn)",
                         ylabel=f"{hd95_column} (mm)")
        axes[1, col].set_ylim(bottom=0.0)
    fig.supxlabel(hd95_miss_caption(metrics, hd95_column), fontsize="small", wrap=True)
    return fig


# --------------------------------------------------------------------------- overlays
def window_for_display(hu_slice: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    """Map HU to [0, 1] through a display window ``(low, high)`` in HU (clipped), float32."""
    low, high = float(window_hu[0]), float(window_hu[1])
    if not high > low:
        raise ValueError(f"window_hu must be (low, high) with high > low, got {window_hu}")
    return np.clip((np.asarray(hu_slice, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def label_overlay_rgba(label_slice: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGBA image (H, W, 4) float32 colouring labels 1 and 2; background fully transparent."""
    label_slice = np.asarray(label_slice)
    rgba = np.zeros((*label_slice.shape, 4), dtype=np.float32)
    for value, colour in LABEL_COLOURS.items():
        where = label_slice == value
        rgba[where, :3] = colour
        rgba[where, 3] = alpha
    return rgba


def _format_dice(value: float) -> str:
    """Dice as text, ``n/a`` when undefined (both empty)."""
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


def plot_overlays(ct_hu_slices: np.ndarray, truth_slices: np.ndarray | None,
                  predictions: Mapping[str, np.ndarray], window_hu: tuple[float, float],
                  titles: Sequence[str]) -> Figure:
    """Grid of CT slices with ground-truth and predicted label overlays.

    Args:
        ct_hu_slices: CT slices in HU, shape (N, H, W), shown as given (orient them before).
        truth_slices: ground-truth label slices (N, H, W), values {0, 1, 2}; None (inference on
            unlabelled scans) drops the ground-truth column and the per-slice Dice.
        predictions: architecture -> predicted label slices (N, H, W).
        window_hu: display window (low, high) in HU, e.g. (-160, 240) for abdomen.
        titles: one title per row (e.g. ``"case 012, z=45"``), shown over the CT panel.

    Returns:
        A Figure with N rows x (2 + len(predictions)) axes: CT alone, CT + truth, then CT + each
        prediction titled with the architecture and that slice's 2D pancreas (1 ∪ 2) Dice.
        Pancreas and tumour are drawn in two colours (see :data:`LABEL_COLOURS`) with a legend.
    """
    ct = np.asarray(ct_hu_slices)
    truth = None if truth_slices is None else np.asarray(truth_slices)
    if ct.ndim != 3:
        raise ValueError(f"ct_hu_slices must be (N, H, W), got shape {ct.shape}")
    if truth is not None and truth.shape != ct.shape:
        raise ValueError(f"truth_slices shape {truth.shape} != ct_hu_slices shape {ct.shape}")
    preds = {name: np.asarray(arr) for name, arr in predictions.items()}
    for name, arr in preds.items():
        if arr.shape != ct.shape:
            raise ValueError(f"prediction {name!r} shape {arr.shape} != CT shape {ct.shape}")
    if len(titles) != ct.shape[0]:
        raise ValueError(f"{len(titles)} titles for {ct.shape[0]} slices")
    low, high = float(window_hu[0]), float(window_hu[1])
    if not high > low:
        raise ValueError(f"window_hu must be (low, high) with high > low, got {window_hu}")

    n_rows, n_cols = ct.shape[0], (1 if truth is None else 2) + len(preds)
    height, width = ct.shape[1:]
    panel = 2.8
    fig = Figure(figsize=(panel * n_cols, panel * n_rows * height / max(width, 1) + 0.8),
                 layout="constrained")
    axes = fig.subplots(max(n_rows, 1), n_cols, squeeze=False)
    for row in range(n_rows):
        panels: list[tuple[str, np.ndarray | None]] = [(f"{titles[row]}\nCT", None)]
        if truth is not None:
            panels.append(("ground truth", truth[row]))
        for name, arr in preds.items():
            if truth is None:
                panels.append((f"{name} prediction", arr[row]))
                continue
            slice_dice = dice(class_mask(arr[row], "pancreas"), class_mask(truth[row], "pancreas"))
            panels.append((f"{name}\npancreas Dice {_format_dice(slice_dice)}", arr[row]))
        for col, (panel_title, labels) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(ct[row], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            if labels is not None:
                ax.imshow(label_overlay_rgba(labels), interpolation="nearest")
            ax.set_title(panel_title, fontsize="small")
            ax.set_axis_off()
    handles = [Patch(facecolor=LABEL_COLOURS[v], alpha=0.8, label=LABEL_NAMES[v])
               for v in sorted(LABEL_COLOURS)]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(f"CT window [{low:g}, {high:g}] HU", fontsize="small")
    return fig


def pick_representative_slices(truth_labels: np.ndarray, n: int, axis: int = 2) -> list[int]:
    """Pick ``n`` slice indices spread over the pancreas extent, including the largest tumour slice.

    The pancreas slices (labels 1 ∪ 2 present) are sorted and sampled at the centred quantiles
    ``(i + 0.5) / n``; if the case has tumour, the slice with the largest tumour area replaces the
    nearest pick. With no pancreas at all the picks are spread over the whole axis.

    Args:
        truth_labels: integer label map (X, Y, Z).
        n: number of slices wanted (>= 1).
        axis: slicing axis (2 = axial for (X, Y, Z) arrays).

    Returns:
        Up to ``n`` distinct slice indices in increasing order (fewer if fewer pancreas slices).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    labels = np.asarray(truth_labels)
    other = tuple(a for a in range(labels.ndim) if a != axis % labels.ndim)
    pancreas_area = class_mask(labels, "pancreas").sum(axis=other)
    tumour_area = class_mask(labels, "tumour").sum(axis=other)
    candidates = np.flatnonzero(pancreas_area)
    if candidates.size == 0:
        candidates = np.arange(labels.shape[axis])
    if candidates.size <= n:
        return [int(i) for i in candidates]
    positions = np.floor((np.arange(n) + 0.5) / n * (candidates.size - 1) + 0.5).astype(int)
    picks = [int(candidates[p]) for p in np.unique(positions)]
    if tumour_area.any():
        best_tumour = int(np.argmax(tumour_area))
        if best_tumour not in picks:
            nearest = int(np.argmin([abs(p - best_tumour) for p in picks]))
            picks[nearest] = best_tumour
    return sorted(set(picks))


# --------------------------------------------------------------------------- paired comparisons
def _warning_lines(table: pd.DataFrame, width: int = 110) -> list[str]:
    """One wrapped ``"† pair, pair: warning"`` line per distinct warning of a comparison table."""
    pairs_by_warning: dict[str, list[str]] = {}
    for row in table.itertuples(index=False):
        if row.warning:
            pairs_by_warning.setdefault(row.warning, []).append(f"{row.model_a} − {row.model_b}")
    return [textwrap.fill(f"† {', '.join(pairs)}: {warning}", width=width, subsequent_indent="   ")
            for warning, pairs in pairs_by_warning.items()]


def plot_paired_comparison(table: pd.DataFrame, statistics: Mapping[str, Any]) -> Figure:
    """:func:`plot_paired_differences` of the first configured comparison (``statistics["comparisons"][0]``)
    in a :func:`~.statistics.paired_comparisons` table."""
    first = statistics["comparisons"][0]
    rows = table[(table["metric"] == first["metric"]) & (table["class"] == first["class"])].reset_index(drop=True)
    return plot_paired_differences(rows, f"paired differences: {first['metric']}, {first['class']}")


def plot_paired_differences(table: pd.DataFrame, title: str) -> Figure:
    """Forest plot of a paired model comparison (:func:`~.statistics.compare_pairs` table).

    Args:
        table: one row per pair with at least ``model_a, model_b, metric, class, n_cases,
            mean_difference, ci_low, ci_high, p_holm, significant, warning`` (and
            ``higher_is_better``, ``confidence`` when present).
        title: figure title (e.g. ``"pancreas Dice, fold 0"``).

    Returns:
        A Figure with one axes: row ``i`` from the top is pair ``i``, a marker at the mean
        difference ``a - b`` (metric unit) with its bootstrap CI as a horizontal error bar (one
        ``ax.containers`` entry per pair, filled red when Holm-significant, open grey otherwise),
        a dashed line at 0, and on the right ``n`` and the Holm p. Pairs with a warning are marked
        "†" in their label and the warnings are listed under the title
        (``ax.get_title(loc="left")``), each distinct warning once with the pairs it applies to.
    """
    n_pairs = len(table)
    notes = _warning_lines(table) if n_pairs else []
    fig = Figure(figsize=(9.0, 1.6 + 0.45 * max(n_pairs, 1) + 0.17 * sum(n.count("\n") + 1 for n in notes)),
                 layout="constrained")
    ax = fig.subplots()
    ax.axvline(0.0, color="0.3", linestyle="--", linewidth=1)
    fig.suptitle(title)
    if n_pairs == 0:
        ax.text(0.5, 0.5, "no pair of models to compare", ha="center", va="center",
                transform=ax.transAxes)
        return fig
    labels = []
    for i, row in enumerate(table.itertuples(index=False)):
        y = n_pairs - 1 - i
        mean, low, high = float(row.mean_difference), float(row.ci_low), float(row.ci_high)
        xerr = np.array([[mean - low], [high - mean]]) if np.isfinite(low) else None
        significant = bool(row.significant)
        colour = "C3" if significant else "0.45"
        ax.errorbar([mean], [y], xerr=xerr, fmt="o", color=colour, ecolor=colour, capsize=4,
                    markerfacecolor=colour if significant else "white", markersize=6)
        labels.append(f"{row.model_a} − {row.model_b}{' †' if row.warning else ''}")
        p_text = "n/a" if not np.isfinite(row.p_holm) else f"{row.p_holm:.3g}"
        ax.annotate(f"n={row.n_cases}, Holm p={p_text} ({'significant' if significant else 'n.s.'})",
                    xy=(1.0, y), xycoords=ax.get_yaxis_transform(), xytext=(6, 0),
                    textcoords="offset points", va="center", ha="left", fontsize="small",
                    color=colour if significant else "black")
    ax.set_yticks(np.arange(n_pairs)[::-1])
    ax.set_yticklabels(labels)
    ax.set_ylim(-0.7, n_pairs - 0.3)
    ax.grid(axis="x", alpha=0.3)
    first = table.iloc[0]
    confidence = float(first["confidence"]) if "confidence" in table else 0.95
    xlabel = f"mean difference a − b of {first['metric']} ({first['class']}), {confidence:.0%} bootstrap CI"
    if "higher_is_better" in table:
        xlabel += f"\n→ right of 0 favours {'a' if bool(first['higher_is_better']) else 'b'}"
    ax.set_xlabel(xlabel)
    ax.set_title("\n".join(notes) if notes else "no warnings", fontsize="small", loc="left",
                 color="C1" if notes else "0.3")
    return fig


# --------------------------------------------------------------------------- detection
def plot_froc(detections: Mapping[str, Mapping[str, Any]], title: str = "tumour FROC") -> Figure:
    """All models' free-response ROC curves on one plot: lesion sensitivity against false-positive
    candidates per case (log scale), the CPM operating points marked.

    Args:
        detections: model name -> its :func:`~.scoring.summarise_detection` block (a summary's
            ``detection["tumour"]``): ``froc`` gives the step curve (``fp_per_case``,
            ``sensitivity``) and the operating points (``fp_rates``, ``sensitivity_at_rates``,
            ``cpm``). A model whose block is not ``available`` (no tumour output), or whose test
            cases hold no lesion, is named in the legend as such, without a curve.
        title: the figure title.

    Returns:
        A Figure with one axes: one step line per model with a curve (``ax.get_lines()``), its
        operating points as markers on the same colour, the legend giving each model's CPM and
        lesion count; x from 1/16 to 16 FP per case (log 2; further right when a curve only rises
        there, so every detected lesion shows), y from 0 to 1.
    """
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    rates: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    handles = []
    right = 16.0
    for index, (name, detection) in enumerate(detections.items()):
        colour = f"C{index % 10}"
        curve = detection.get("froc") if detection.get("available") else None
        if curve is None or not curve.get("n_lesions"):
            why = "no tumour output" if curve is None else "no true lesion"
            handles.append(Patch(facecolor="white", edgecolor=colour, label=f"{name}: n/a ({why})"))
            continue
        rates = curve["fp_rates"]
        fp = np.asarray(curve["fp_per_case"], dtype=float)
        sensitivity = np.asarray(curve["sensitivity"], dtype=float)
        right = max(right, 2.0 ** np.ceil(np.log2(max(fp[-1], 1.0) * 1.5)))
        # extend the last operating point to the right edge: the curve stays flat past the lowest threshold
        fp = np.r_[fp, max(2.0 ** 10, fp[-1])]
        sensitivity = np.r_[sensitivity, sensitivity[-1]]
        (line,) = ax.step(np.maximum(fp, 1 / 16), sensitivity, where="post", color=colour,
                          label=f"{name}: CPM {curve['cpm']:.3f} ({curve['n_detected']}/{curve['n_lesions']} lesions, "
                                f"{curve['n_cases']} cases)")
        ax.plot(curve["fp_rates"], curve["sensitivity_at_rates"], "o", color=colour, markersize=4)
        handles.append(line)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, right)
    ticks = [*rates, *(2.0 ** k for k in range(int(np.log2(max(rates))) + 1, int(np.log2(right)) + 1))]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"1/{round(1 / r)}" if r < 1 else f"{r:g}" for r in ticks])
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false-positive candidates per case")
    ax.set_ylabel("lesion sensitivity (IoU ≥ 0.1)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title)
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no models", ha="center", va="center", transform=ax.transAxes)
    return fig
