"""CT intensity normalisation in float32: HU windowing and nnU-Net-style foreground z-scoring.

All arithmetic is float32 (never integer), so no HU value can overflow or wrap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ForegroundIntensityStats:
    """Training-split foreground HU statistics (nnU-Net's CT normalisation)."""

    clip_low_hu: float   # 0.5th percentile of foreground HU
    clip_high_hu: float  # 99.5th percentile of foreground HU
    mean_hu: float       # mean of the clipped foreground HU
    std_hu: float        # std of the clipped foreground HU
    n_voxels: int        # number of sampled foreground voxels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_hu(hu: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``[low, high]`` and scale linearly to [0, 1]; returns float32 of the same shape."""
    low, high = float(window_hu[0]), float(window_hu[1])
    if not high > low:
        raise ValueError(f"window_hu must satisfy low < high, got {window_hu}")
    out = np.asarray(hu, dtype=np.float32)
    out = np.clip(out, low, high)
    out -= np.float32(low)
    out /= np.float32(high - low)
    return out


def sample_foreground_hu(hu: np.ndarray, foreground: np.ndarray, max_voxels: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Draw up to ``max_voxels`` HU values (float32, 1D) uniformly from the voxels where ``foreground``."""
    values = np.asarray(hu)[np.asarray(foreground, dtype=bool)]
    if values.size > max_voxels:
        values = rng.choice(values, size=max_voxels, replace=False)
    return values.astype(np.float32, copy=False)


def fit_foreground_stats(samples: Iterable[np.ndarray],
                         percentiles: tuple[float, float] = (0.5, 99.5)) -> ForegroundIntensityStats:
    """Compute clip percentiles, then mean/std of the clipped values, from foreground HU samples."""
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples])
    if values.size == 0:
        raise ValueError("no foreground voxels in the training split: cannot fit intensity stats")
    low, high = np.percentile(values, percentiles)
    clipped = np.clip(values, low, high)
    return ForegroundIntensityStats(clip_low_hu=float(low), clip_high_hu=float(high),
                                    mean_hu=float(clipped.mean()),
                                    std_hu=float(max(clipped.std(), 1e-6)), n_voxels=int(values.size))


def zscore_hu(hu: np.ndarray, stats: ForegroundIntensityStats) -> np.ndarray:
    """Clip HU to the foreground percentiles and z-score with foreground mean/std; float32."""
    out = np.asarray(hu, dtype=np.float32)
    out = np.clip(out, stats.clip_low_hu, stats.clip_high_hu)
    out -= np.float32(stats.mean_hu)
    out *= np.float32(1.0 / stats.std_hu)
    return out


def normalise_hu(hu: np.ndarray, mode: str, window: tuple[float, float] | None = None,
                 stats: ForegroundIntensityStats | None = None) -> np.ndarray:
    """Dispatch on ``mode``: ``"window"`` (needs ``window``) or ``"zscore"`` (needs ``stats``)."""
    if mode == "window":
        if window is None:
            raise ValueError("intensity mode 'window' needs window_hu")
        return window_hu(hu, window)
    if mode == "zscore":
        if stats is None:
            raise ValueError("intensity mode 'zscore' needs training foreground stats")
        return zscore_hu(hu, stats)
    raise ValueError(f"unknown intensity mode {mode!r}; expected 'window' or 'zscore'")
