"""Deterministic synthetic abdominal CT phantoms laid out like MSD Task07_Pancreas.

The data made here is SYNTHETIC: procedurally drawn shapes, not patient images. It exists so the
pipeline can be built, tested and benchmarked without the real data set.

Anatomy is modelled in world millimetres (RAS+: +x towards the patient's right, +y anterior,
+z superior) and then sampled at voxel centres, so the voxel spacing changes the resolution of a
case, never the size of its organs. Each case draws its own spacing, slice thickness and z
coverage from :class:`PhantomConfig`, its own body habitus, organ positions, contrast phase and
(with ``tumour_probability``) a hypo-attenuating pancreatic tumour. In a written data set,
``tumour_fraction`` instead fixes the share of cases with a tumour exactly
(:func:`tumour_indices`).

Two presets draw the lesions (``PhantomConfig.preset``):

* ``easy`` (the default, and the only model before the hard one existed): one 12-30 mm
  near-spherical tumour per tumour case, 30-50 HU darker than the gland, always inside it. Its
  arrays are byte-identical to those of earlier versions for the same seed and settings.
* ``hard``: cancer-like tumours, 1-2 per tumour case (``second_tumour_probability``), 5-40 mm
  equivalent diameter (``small_tumour_share`` of them under 20 mm), -60 to -5 HU against the
  parenchyma (down to iso-attenuating), lobulated or irregular, at head, body or tail
  (``tumour_site_weights``), some at or through the gland's edge (``edge_tumour_share``), with
  upstream (tail-ward) main-duct dilation and gland atrophy (``duct_dilation_probability``);
  plus simple cysts (``cyst_probability``), drawn independently of the tumours, as mimics.

Labels of the hard preset: label 2 is exactly the mass. Where an edge tumour breaches the gland,
label 2 extends outside the gland's outline, as MSD labels a tumour including the part that
exceeds the organ. Cysts and the dilated duct are labelled pancreas (1), never 2. That is this
phantom's convention only: MSD's label 2 ("cancer") covers every resected pancreatic mass,
cystic neoplasms included, so a real cystic lesion may well be label 2 there.

Conventions: arrays are in NIfTI voxel order ``(X, Y, Z)``; HU images are ``int16`` clipped to
[-1024, 3071]; labels are ``uint8`` with the values of :mod:`pancreas_seg.core.labels` (0 background,
1 pancreas, 2 tumour; with the easy preset tumour voxels always lie inside the pancreas, with the
hard one they may extend past its outline); affines are float64 ``(4, 4)`` mapping voxel indices to mm.

Everything is float32 and vectorised: each structure is evaluated by broadcasting 1-D world
coordinates over the bounding box of that structure only, so a 512 x 512 x 100 case takes a few
seconds on one core. The same ``seed`` always gives byte-identical arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from pancreas_seg.core.labels import MSD_DATASET_LABELS, PANCREAS, TUMOUR
from pancreas_seg.imaging.nifti_io import save_nifti

logger = logging.getLogger(__name__)

#: The generator's identity in ``dataset.json`` and in the cache fingerprint. It keeps the module's
#: old path on purpose: changing it would change every fingerprint, so existing phantom folders
#: would no longer be reused (they are never overwritten: ingestion would refuse to run).
GENERATOR_NAME = "pancreas_seg.imaging.phantom"
#: Bump whenever the drawn anatomy or the files change, so old caches are not reused.
GENERATOR_VERSION = "1"
#: The lesion models of :class:`PhantomConfig` (``preset``); ``easy`` is the original one.
PRESETS: tuple[str, ...] = ("easy", "hard")
#: Version of the hard preset's drawing, in the fingerprint of hard data sets only (so the easy
#: fingerprints never change). Bump whenever the hard lesions change.
HARD_PRESET_VERSION = "1"
#: Tumours under this equivalent diameter count as small (``small_tumour_share``), mm.
SMALL_TUMOUR_MM = 20.0
#: Tumour sites along the gland, head first (the order of ``tumour_site_weights``).
TUMOUR_SITES: tuple[str, ...] = ("head", "body", "tail")
HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1000.0
DATASET_NAME = "Task07_Pancreas (SYNTHETIC phantoms - not patient data)"
_PARTIAL_TAG = ".partial-"

Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomConfig:
    """How synthetic cases are drawn. Ranges are ``(low, high)`` and sampled uniformly per case.

    Attributes:
        shape_xy_px: in-plane matrix size (X = Y), px.
        spacing_xy_mm: in-plane pixel spacing range, mm (the same spacing is used for X and Y).
        slice_thickness_mm: slice spacing range, mm.
        z_extent_mm: cranio-caudal coverage range, mm; ``n_slices = round(extent / thickness)``.
        noise_hu: standard deviation of the (slightly correlated) image noise, HU.
        tumour_probability: chance that a case contains a tumour (label 2), drawn per case.
        tumour_fraction: ``None`` (default): each case draws its tumour with
            ``tumour_probability``. A share in [0, 1]: in a written data set exactly
            ``round(n * tumour_fraction)`` (half up) of the ``n`` labelled cases, and of the
            unlabelled ones separately, have a tumour, which ones chosen with the data-set seed
            (:func:`tumour_indices`); ``tumour_probability`` is then unused. The rest of each
            case's anatomy is the same either way.
        non_ras_every: in a written data set every ``non_ras_every``-th case is stored LPS
            instead of RAS (0 or less: all RAS).
        plain_phase_probability: chance that a case is unenhanced: kidneys (~35 HU), vessels and
            spleen lose their contrast; the pancreas (90-110 HU) and liver are drawn as usual.
        preset: the lesion model, one of :data:`PRESETS`. ``easy`` (default): the original
            spherical tumours; every field below must then keep its default (it is unused, and
            it is left out of :meth:`to_dict` and so of the data-set fingerprint). ``hard``:
            cancer-like tumours and cyst mimics drawn with the fields below.

    Hard preset only (defaults in brackets):
        tumour_diameter_mm: equivalent diameter range of a tumour, mm (the diameter of the
            sphere of the same volume) [(5, 40)].
        small_tumour_share: share of tumours drawn under :data:`SMALL_TUMOUR_MM` (20 mm), the
            others over it, each uniform within ``tumour_diameter_mm`` [0.4].
        tumour_contrast_hu: range of tumour minus parenchyma HU; -5 is nearly iso-attenuating
            [(-60, -5)].
        tumour_site_weights: relative frequency of head, body and tail sites [(0.6, 0.25, 0.15)].
        second_tumour_probability: chance that a tumour case has a second tumour [0.2]. Cases
            without a tumour have none, so a case has 0, 1 or 2 tumours, and ``tumour_fraction``
            / ``tumour_probability`` keep their meaning (cases with at least one).
        edge_tumour_share: share of tumours placed at the gland's edge: centred 0.1 to 0.8 of
            their radius inside the outline, they protrude through it (label 2 outside the
            gland there); the others lie inside a gland swollen around them [0.3].
        duct_dilation_probability: chance that a tumour obstructs the main duct: the duct
            tail-ward of it is dilated (fluid, 0-20 HU, label 1) and the gland there atrophies.
            Needs at least 10 mm of gland tail-ward of the mass [0.6].
        dilated_duct_diameter_mm: diameter range of the dilated duct, mm [(3, 8)].
        atrophy_radius_factor: range of the factor the gland's radius is multiplied by tail-ward
            of an obstructing tumour (the duct keeps a rim of >= 1.5 mm) [(0.5, 0.8)].
        cyst_probability: chance that a case has a simple cyst, whether or not it has a tumour:
            round, sharp, water density (0-15 HU), label 1 (never 2) [0.2].
        cyst_diameter_mm: diameter range of a cyst, mm [(5, 25)].
    """

    shape_xy_px: int = 256
    spacing_xy_mm: tuple[float, float] = (1.4, 1.8)
    slice_thickness_mm: tuple[float, float] = (2.0, 5.0)
    z_extent_mm: tuple[float, float] = (140.0, 180.0)
    noise_hu: float = 12.0
    tumour_probability: float = 0.5
    non_ras_every: int = 3
    plain_phase_probability: float = 0.2
    tumour_fraction: float | None = None
    # the lesion model; the fields after it are the hard preset's (metadata "hard")
    preset: str = "easy"
    tumour_diameter_mm: tuple[float, float] = field(default=(5.0, 40.0), metadata={"hard": True})
    small_tumour_share: float = field(default=0.4, metadata={"hard": True})
    tumour_contrast_hu: tuple[float, float] = field(default=(-60.0, -5.0), metadata={"hard": True})
    tumour_site_weights: tuple[float, float, float] = field(default=(0.6, 0.25, 0.15),
                                                            metadata={"hard": True})
    second_tumour_probability: float = field(default=0.2, metadata={"hard": True})
    edge_tumour_share: float = field(default=0.3, metadata={"hard": True})
    duct_dilation_probability: float = field(default=0.6, metadata={"hard": True})
    dilated_duct_diameter_mm: tuple[float, float] = field(default=(3.0, 8.0), metadata={"hard": True})
    atrophy_radius_factor: tuple[float, float] = field(default=(0.5, 0.8), metadata={"hard": True})
    cyst_probability: float = field(default=0.2, metadata={"hard": True})
    cyst_diameter_mm: tuple[float, float] = field(default=(5.0, 25.0), metadata={"hard": True})

    def __post_init__(self) -> None:
        # accept lists (e.g. from YAML parameters) and ints: store canonical tuples of floats
        for name in ("spacing_xy_mm", "slice_thickness_mm", "z_extent_mm"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2:
                raise ValueError(f"{name} must be a (low, high) pair, got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        for name, kind in (("shape_xy_px", int), ("non_ras_every", int), ("noise_hu", float),
                           ("tumour_probability", float), ("plain_phase_probability", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.tumour_fraction is not None:
            object.__setattr__(self, "tumour_fraction", float(self.tumour_fraction))
        if self.shape_xy_px < 8:
            raise ValueError(f"shape_xy_px must be >= 8, got {self.shape_xy_px}")
        for name in ("spacing_xy_mm", "slice_thickness_mm", "z_extent_mm"):
            low, high = (float(v) for v in getattr(self, name))
            if not (0.0 < low <= high and math.isfinite(high)):
                raise ValueError(f"{name} must be a (low, high) range with 0 < low <= high, "
                                 f"got {getattr(self, name)}")
        if not (self.noise_hu >= 0.0 and math.isfinite(self.noise_hu)):
            raise ValueError(f"noise_hu must be >= 0, got {self.noise_hu}")
        for name in ("tumour_probability", "plain_phase_probability", "tumour_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self._check_preset()

    def _check_preset(self) -> None:
        """Canonicalise and validate ``preset`` and the hard preset's fields."""
        object.__setattr__(self, "preset", str(self.preset))
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        for name in ("tumour_diameter_mm", "tumour_contrast_hu", "dilated_duct_diameter_mm",
                     "atrophy_radius_factor", "cyst_diameter_mm"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not all(math.isfinite(v) for v in value) or value[0] > value[1]:
                raise ValueError(f"{name} must be a finite (low, high) pair with low <= high, "
                                 f"got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        for name in ("tumour_diameter_mm", "dilated_duct_diameter_mm", "cyst_diameter_mm"):
            if getattr(self, name)[0] <= 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0.0 < self.atrophy_radius_factor[0] and self.atrophy_radius_factor[1] <= 1.0):
            raise ValueError(f"atrophy_radius_factor must lie in (0, 1], got {self.atrophy_radius_factor}")
        weights = tuple(float(v) for v in self.tumour_site_weights)
        if len(weights) != len(TUMOUR_SITES) or min(weights) < 0.0 or not 0.0 < sum(weights) < math.inf:
            raise ValueError(f"tumour_site_weights must be {len(TUMOUR_SITES)} weights >= 0 "
                             f"({', '.join(TUMOUR_SITES)}) with a positive sum, got {self.tumour_site_weights}")
        object.__setattr__(self, "tumour_site_weights", weights)
        for name in ("small_tumour_share", "second_tumour_probability", "edge_tumour_share",
                     "duct_dilation_probability", "cyst_probability"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
            object.__setattr__(self, name, value)
        if self.preset == "easy":
            changed = [f.name for f in dataclasses.fields(self)
                       if f.metadata.get("hard") and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{', '.join(changed)}: used by preset 'hard' only, but preset is "
                                 "'easy'; set preset: hard or leave them at their defaults")

    @staticmethod
    def hard_fields() -> tuple[str, ...]:
        """Names of the fields that only the hard preset uses."""
        return tuple(f.name for f in dataclasses.fields(PhantomConfig) if f.metadata.get("hard"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples become lists).

        ``tumour_fraction`` is left out while it is ``None``, and with the easy preset so are
        ``preset`` and the hard preset's fields, so the fingerprints of data sets written before
        they existed stay the same and those folders are reused.
        """
        fields_ = dataclasses.asdict(self)
        if fields_["tumour_fraction"] is None:
            del fields_["tumour_fraction"]
        if self.preset == "easy":
            for name in ("preset", *self.hard_fields()):
                del fields_[name]
        return json.loads(json.dumps(fields_))


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One synthetic case.

    Attributes:
        hu: int16 ``(X, Y, Z)`` CT numbers, HU, clipped to [-1024, 3071].
        label: uint8 ``(X, Y, Z)``, 0 background, 1 pancreas, 2 tumour.
        affine: float64 ``(4, 4)`` voxel -> world mm (RAS+ world).
        meta: what was drawn (spacing, orientation, phase, tumour, ...); JSON-ready.
    """

    hu: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Sampling grid and primitive shapes (all in world mm, evaluated inside bounding boxes)
# --------------------------------------------------------------------------------------------
class _Grid:
    """Voxel-centre world coordinates of an RAS-stored volume with spacing ``sp`` mm."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 origin: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.coords = [(self.origin[a] + self.spacing[a] * np.arange(shape[a])).astype(np.float32)
                       for a in range(3)]

    def affine(self) -> np.ndarray:
        """float64 (4, 4) voxel -> mm for RAS storage."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Index slices of the voxels whose centres lie in the world box [lo, hi] (None if empty)."""
        out = []
        for a in range(3):
            i0 = max(0, math.ceil((float(lo[a]) - self.origin[a]) / self.spacing[a] - 1e-6))
            i1 = min(self.shape[a], math.floor((float(hi[a]) - self.origin[a]) / self.spacing[a]
                                               + 1e-6) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return (out[0], out[1], out[2])

    def axes(self, box: Box, centre: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1-D float32 coordinates (minus ``centre``) of a box along X, Y and Z."""
        c = np.zeros(3) if centre is None else centre
        return tuple(self.coords[a][box[a]] - np.float32(c[a]) for a in range(3))  # type: ignore[return-value]


def _rotation(angle_z_deg: float = 0.0, angle_y_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation: about y (tilt) then about z (in-plane); columns are the local axes in world."""
    az, ay = math.radians(angle_z_deg), math.radians(angle_y_deg)
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    return rz @ ry


def _ellipsoid(grid: _Grid, centre: np.ndarray, semi: np.ndarray,
               rot: np.ndarray | None = None) -> tuple[Box, np.ndarray] | None:
    """Normalised squared radius ``q`` (float32, box-shaped) of an ellipsoid; inside is q <= 1.

    ``semi`` are the semi-axes in mm along the local axes, ``rot`` maps local -> world.
    """
    centre = np.asarray(centre, dtype=np.float64)
    semi = np.asarray(semi, dtype=np.float64)
    rot = np.eye(3) if rot is None else rot
    extent = np.sqrt(((rot * semi[None, :]) ** 2).sum(axis=1))
    box = grid.box(centre - extent, centre + extent)
    if box is None:
        return None
    dx, dy, dz = grid.axes(box, centre)
    dx, dy, dz = dx[:, None, None], dy[None, :, None], dz[None, None, :]
    q: np.ndarray | float = 0.0
    for j in range(3):
        u = None
        for comp, coord in zip(rot[:, j], (dx, dy, dz), strict=True):
            if abs(comp) > 1e-9:
                term = coord * np.float32(comp / semi[j])
                u = term if u is None else u + term
        q = q + u * u  # type: ignore[operator]
    return box, np.asarray(q, dtype=np.float32)


def _prism(grid: _Grid, centre_xy: tuple[float, float], semi_xy: tuple[float, float]
           ) -> tuple[Box, np.ndarray] | None:
    """Axis-aligned elliptic cylinder along z over the whole grid: ``q`` (float32), inside q <= 1."""
    (cx, cy), (ax, ay) = centre_xy, semi_xy
    box = grid.box(np.array([cx - ax, cy - ay, -1e9]), np.array([cx + ax, cy + ay, 1e9]))
    if box is None:
        return None
    dx, dy, _ = grid.axes(box, np.array([cx, cy, 0.0]))
    q2 = (dx[:, None] / np.float32(ax)) ** 2 + (dy[None, :] / np.float32(ay)) ** 2
    nz = box[2].stop - box[2].start
    return box, np.repeat(q2[:, :, None], nz, axis=2)


def _catmull_rom(points: np.ndarray, radii: np.ndarray, step_mm: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth curve through control points, resampled every ``step_mm`` of arc length.

    Returns centres (n, 3) mm, radii (n,) mm (interpolated) and arc length (n,) mm.
    """
    pts = np.asarray(points, dtype=np.float64)
    rad = np.asarray(radii, dtype=np.float64)
    ext = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    t = np.linspace(0.0, 1.0, 24, endpoint=False)[:, None]
    dense, dense_r = [], []
    for i in range(len(pts) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        seg = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                     + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)
        dense.append(seg)
        dense_r.append(rad[i] + (rad[i + 1] - rad[i]) * t[:, 0])
    dense.append(pts[-1:])
    dense_r.append(rad[-1:])
    curve, curve_r = np.vstack(dense), np.concatenate(dense_r)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
    n = max(2, int(math.ceil(arc[-1] / max(step_mm, 1e-3))) + 1)
    s = np.linspace(0.0, arc[-1], n)
    centres = np.stack([np.interp(s, arc, curve[:, a]) for a in range(3)], axis=1)
    return centres, np.interp(s, arc, curve_r), s


def _tube(grid: _Grid, centres: np.ndarray, radii: np.ndarray, y_scale: float = 1.0
          ) -> tuple[Box, np.ndarray] | None:
    """Union of spheres along a sampled curve: ``g = min_i |p - c_i|^2 / r_i^2`` (float32).

    Inside the tube is g <= 1; g <= k^2 is a concentric lumen of relative radius k. With
    ``y_scale`` < 1 every sphere is flattened antero-posteriorly (semi-axis r * y_scale).
    """
    scale = np.array([1.0, y_scale, 1.0])
    ext = radii[:, None] * scale[None, :]
    box = grid.box((centres - ext).min(axis=0), (centres + ext).max(axis=0))
    if box is None:
        return None
    g = np.full(tuple(s.stop - s.start for s in box), np.inf, dtype=np.float32)
    starts = np.array([s.start for s in box])
    for c, r, e in zip(centres, radii, ext, strict=True):
        sub = grid.box(c - e, c + e)
        if sub is None:
            continue
        dx, dy, dz = grid.axes(sub, c)
        inv = np.float32(1.0 / r)
        d = ((dx * inv) ** 2)[:, None, None] + ((dy * np.float32(1.0 / (r * y_scale))) ** 2)[
            None, :, None] + ((dz * inv) ** 2)[None, None, :]
        rel = tuple(slice(sub[a].start - starts[a], sub[a].stop - starts[a]) for a in range(3))
        view = g[rel]
        np.minimum(view, d, out=view)
    return box, g


def _smooth_field(grid: _Grid, rng: np.random.Generator, lattice_mm: float, amplitude: float
                  ) -> np.ndarray:
    """Low-frequency random field (float32, grid shape): lattice noise, linearly interpolated."""
    mats = []
    for a in range(3):
        c = grid.coords[a].astype(np.float64)
        n_lat = max(2, int(math.ceil((c[-1] - c[0]) / lattice_mm)) + 2)
        pos = (c - c[0]) / lattice_mm
        i0 = np.clip(np.floor(pos).astype(int), 0, n_lat - 2)
        w = (pos - i0).astype(np.float32)
        m = np.zeros((len(c), n_lat), dtype=np.float32)
        m[np.arange(len(c)), i0] = 1.0 - w
        m[np.arange(len(c)), i0 + 1] += w
        mats.append(m)
    lat = rng.standard_normal((mats[0].shape[1], mats[1].shape[1], mats[2].shape[1]),
                              dtype=np.float32) * np.float32(amplitude)
    t = np.tensordot(lat, mats[2], axes=([2], [1]))             # (lx, ly, Z)
    t = np.einsum("yj,ijk->iyk", mats[1], t, optimize=True)     # (lx, Y, Z)
    nx = mats[0].shape[0]
    return (mats[0] @ t.reshape(t.shape[0], -1)).reshape(nx, t.shape[1], t.shape[2])


def _kernel_noise_gain(sigma: float, truncate: float) -> float:
    """Std reduction of white noise by scipy's 1-D Gaussian kernel (sqrt of sum of squared taps)."""
    if sigma <= 0:
        return 1.0
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float(np.sqrt((w ** 2).sum()))


# --------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------
class _Canvas:
    """HU volume (float32) being painted, plus the pancreas/tumour label (uint8)."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, box: Box, mask: np.ndarray, value: float,
              within: np.ndarray | None = None) -> None:
        """Set ``hu[box][mask] = value``; ``within`` is a full-size bool mask to clip to."""
        if within is not None:
            mask = mask & within[box]
        self.hu[box][mask] = np.float32(value)


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _draw_grid(rng: np.random.Generator, config: PhantomConfig) -> _Grid:
    """Per-case spacing, slice count and origin (world mm)."""
    sxy = float(np.clip(round(_u(rng, *config.spacing_xy_mm), 4), *config.spacing_xy_mm))
    sz = float(np.clip(round(_u(rng, *config.slice_thickness_mm), 2), *config.slice_thickness_mm))
    extent = _u(rng, *config.z_extent_mm)
    nz = max(1, int(round(extent / sz)))
    nxy = int(config.shape_xy_px)
    centre = np.array([_u(rng, -10, 10), _u(rng, -12, 8), _u(rng, -8, 8)])
    spacing = (sxy, sxy, sz)
    origin = tuple(float(round(centre[a] - 0.5 * (n - 1) * spacing[a], 4))
                   for a, n in enumerate((nxy, nxy, nz)))
    return _Grid((nxy, nxy, nz), spacing, origin)  # type: ignore[arg-type]


class _Anatomy:
    """Draws one case's anatomy (world mm) and paints it onto a :class:`_Canvas` (RAS storage).

    All random parameters are drawn whether or not a structure falls inside the field of view,
    so the anatomy depends only on the anatomy stream, never on the sampling grid.
    """

    def __init__(self, grid: _Grid, rng: np.random.Generator, config: PhantomConfig,
                 has_tumour: bool | None = None, lesion_rng: np.random.Generator | None = None) -> None:
        self.grid, self.rng, self.cv = grid, rng, _Canvas(grid)
        # the hard preset draws its lesions from a stream of their own (the anatomy stays the same)
        self.config, self.lesion_rng = config, lesion_rng
        self.hard = config.preset == "hard"
        u = self.u
        self.plain = rng.random() < config.plain_phase_probability
        drawn = rng.random() < config.tumour_probability   # always drawn: the stream stays the same
        self.has_tumour = drawn if has_tumour is None else bool(has_tumour)
        self.A, self.B = u(140, 160), u(100, 120)         # body semi-axes (x, y), mm
        self.kx, self.ky = self.A / 150.0, self.B / 110.0  # habitus scale of organ positions
        self.k = math.sqrt(self.kx * self.ky)               # ... and of organ sizes
        self.zc = u(-8, 8)                                  # level of the pancreas, mm
        self.yv = -0.40 * self.B                            # vertebral body centre, mm
        plain = self.plain
        self.hu = {                                         # tissue CT numbers of this case, HU
            "subcutaneous_fat": u(-115, -95), "visceral_fat": u(-100, -82), "muscle": u(42, 58),
            "liver": u(55, 65), "pancreas": u(90, 110), "bowel": u(55, 75),
            "duodenum": u(60, 80), "duodenal_fluid": u(10, 30), "gastric_fluid": u(5, 25),
            "colon_gas": u(-980, -900), "gallbladder": u(0, 20), "pancreatic_duct": u(10, 25),
            "bone_cortex": u(700, 1000), "bone_cancellous": u(220, 290), "disc": u(75, 95),
            "vertebral_arch": u(550, 750), "csf": u(5, 20),
            "spleen": u(45, 55) if plain else u(105, 120),
            "aorta": u(40, 50) if plain else u(150, 180),
            "portal_vein": u(38, 48) if plain else u(150, 170),
            "ivc": u(38, 48) if plain else u(125, 150),
            "kidney_cortex": u(30, 40) if plain else u(140, 170),
        }
        self.hu["kidney_medulla"] = self.hu["kidney_cortex"] - (2.0 if plain else u(25, 45))
        self.hu["tumour"] = self.hu["pancreas"] - u(30, 50)
        self.wall_in = self.cav = np.zeros(0, dtype=bool)
        self.tumour_voxels = self.pancreas_voxels = 0
        self.tumour_radius = 0.0
        self.lesions: list[dict[str, Any]] = []          # hard preset: what was drawn (meta)
        self.cysts: list[dict[str, Any]] = []
        self.dilated_duct: dict[str, Any] | None = None

    def u(self, low: float, high: float) -> float:
        """One uniform draw as a Python float (keeps float32 arithmetic float32)."""
        return _u(self.rng, low, high)

    def fill(self, shape: tuple[Box, np.ndarray] | None, value: float, level: float = 1.0,
             within: np.ndarray | None = None) -> None:
        """Paint ``value`` where a shape's field is <= ``level`` (no-op outside the grid)."""
        if shape is not None:
            self.cv.paint(shape[0], shape[1] <= level, value, within=within)

    def render(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Paint everything, back to front. Returns HU float32, label uint8 and meta."""
        self.paint_body()
        self.paint_spine_and_back()
        self.paint_liver()
        self.paint_stomach()
        self.paint_spleen_and_kidneys()
        self.paint_bowel()
        self.draw_pancreas_curve()
        self.paint_duodenum()
        self.paint_vessels()
        self.paint_pancreas()
        if self.hard:
            meta = {"contrast_phase": "plain" if self.plain else "portal_venous", "preset": "hard",
                    "tumour_drawn": bool(self.has_tumour),
                    "pancreas_voxels": self.pancreas_voxels, "tumour_voxels": self.tumour_voxels,
                    "lesions": self.lesions, "cysts": self.cysts, "dilated_duct": self.dilated_duct,
                    "hu": {key: round(val, 1) for key, val in self.hu.items() if key != "tumour"}}
            return self.cv.hu, self.cv.label, meta
        meta = {"contrast_phase": "plain" if self.plain else "portal_venous",
                "tumour_drawn": bool(self.has_tumour),
                "tumour_radius_mm": round(self.tumour_radius, 2) if self.has_tumour else None,
                "pancreas_voxels": self.pancreas_voxels, "tumour_voxels": self.tumour_voxels,
                "hu": {key: round(val, 1) for key, val in self.hu.items()}}
        return self.cv.hu, self.cv.label, meta

    # ---- body outline, subcutaneous fat, muscle wall, visceral cavity (full grid) ----
    def paint_body(self) -> None:
        u, (xs, ys, zs) = self.u, self.grid.coords
        t_sc, t_m, expo = u(8, 25), u(6, 11), u(2.0, 2.5)   # fat, muscle (mm), outline exponent
        w = (u(0.02, 0.05), u(0, 2 * math.pi), u(0.02, 0.05), u(0, 2 * math.pi))
        zz = zs.astype(np.float64)
        fx = 1.0 + w[0] * np.sin(zz / 55.0 + w[1])
        fy = 1.0 + w[2] * np.sin(zz / 70.0 + w[3])

        def outline(shrink: float) -> np.ndarray:
            a = (self.A * fx - shrink).astype(np.float32)
            b_ant = (1.08 * self.B * fy - shrink).astype(np.float32)
            b_post = (0.92 * self.B * fy - shrink).astype(np.float32)
            px = np.abs(xs[:, None] / a[None, :]) ** np.float32(expo)            # (X, Z)
            b = np.where(ys[:, None] > 0, b_ant[None, :], b_post[None, :])
            py = np.abs(ys[:, None] / b) ** np.float32(expo)                      # (Y, Z)
            return (px[:, None, :] + py[None, :, :]) <= 1.0

        self.cv.hu[outline(0.0)] = self.hu["subcutaneous_fat"]
        self.wall_in = outline(t_sc)
        self.cv.hu[self.wall_in] = self.hu["muscle"]
        self.cav = outline(t_sc + t_m)
        self.cv.hu[self.cav] = self.hu["visceral_fat"]

    # ---- paraspinal muscles, psoas, vertebrae and discs ----
    def paint_spine_and_back(self) -> None:
        u, g, hu, kx, k, yv, zc = self.u, self.grid, self.hu, self.kx, self.k, self.yv, self.zc
        rvx, rvy = u(19, 23), u(15, 18)
        for side in (-1, 1):
            self.fill(_prism(g, (side * 33 * kx, yv - 38), (24 * k, 21 * k)), hu["muscle"],
                      within=self.wall_in)
            cps = np.array([[side * 28.0, yv + 4, zc + 40], [side * 38 * kx, yv + 6, zc - 20],
                            [side * 48 * kx, yv + 14, zc - 110]])
            cen, rad, _ = _catmull_rom(cps, np.array([5.0, 12.0, 22.0]) * k, 2.0)
            self.fill(_tube(g, cen, rad), hu["muscle"] - 3)
        pitch, height, phase = u(30, 36), u(7, 10), u(0, 36)
        zs = g.coords[2]
        is_disc = ((zs - np.float32(phase)) % np.float32(pitch)) < np.float32(height)
        r = _prism(g, (0.0, yv), (rvx, rvy))
        if r:
            box, q = r
            disc = is_disc[box[2]][None, None, :]
            self.cv.paint(box, (q <= 1) & ~disc, hu["bone_cortex"])
            self.cv.paint(box, (q <= (1 - 2.2 / rvx) ** 2) & ~disc, hu["bone_cancellous"])
            self.cv.paint(box, (q <= 1) & disc, hu["disc"])
        y_canal = yv - rvy - 8.5
        for centre, semi, within in (((0.0, y_canal), (13.5, 13.0), None),           # arch
                                     ((0.0, y_canal - 22), (5.0, 12.0), self.wall_in)):  # spinous
            r = _prism(g, centre, semi)
            if r:
                box, q = r
                self.cv.paint(box, (q <= 1) & ~is_disc[box[2]][None, None, :],
                              hu["vertebral_arch"], within=within)
        self.fill(_prism(g, (0.0, y_canal), (8.0, 8.5)), hu["csf"])
        self.aorta_xy = (-10 * kx + u(-3, 3), yv + rvy + 13 + u(-2, 2))
        self.ivc_xy = (24 * kx + u(-3, 3), yv + rvy + 16 + u(-2, 2))

    # ---- liver (right upper quadrant; carved back around the pancreas head) and gallbladder ----
    def paint_liver(self) -> None:
        u, g, hu, kx, ky, k, zc = self.u, self.grid, self.hu, self.kx, self.ky, self.k, self.zc
        self.fill(_ellipsoid(g, np.array([72 * kx, 4 * ky, zc + 72]), np.array([80, 88, 108]) * k),
                  hu["liver"], within=self.cav)
        r = _ellipsoid(g, np.array([-12 * kx, -4 * ky, zc - 42]),
                       np.array([u(66, 76) * kx, 80 * ky, 98]), _rotation(u(-10, 10), 0))
        if r:
            box, q = r
            liver = np.abs(self.cv.hu[box] - np.float32(hu["liver"])) < 0.01
            self.cv.paint(box, (q <= 1) & liver, hu["visceral_fat"])
        has_gb = self.rng.random() < 0.7
        gb = _ellipsoid(g, np.array([48 * kx, 40 * ky, zc + u(15, 30)]),
                        np.array([u(11, 16), u(11, 16), u(25, 38)]), _rotation(u(-30, 30), 20))
        if has_gb:
            self.fill(gb, hu["gallbladder"], within=self.cav)

    # ---- stomach: wall, fluid, and gas in the non-dependent (anterior) part ----
    def paint_stomach(self) -> None:
        u, g, hu, kx, ky, k, zc = self.u, self.grid, self.hu, self.kx, self.ky, self.k, self.zc
        air_level = u(0.2, 0.7)
        for cen, semi in ((np.array([-42 * kx, 38 * ky, zc + 52]), np.array([44, 34, 55]) * k),
                          (np.array([8 * kx, 52 * ky, zc + 18]), np.array([36, 17, 19]) * k)):
            r = _ellipsoid(g, cen, semi, _rotation(u(-20, 20), 0))
            if r:
                box, q = r
                self.cv.paint(box, q <= 1, hu["bowel"], within=self.cav)
                lumen = q <= (1 - 5.0 / semi[1]) ** 2
                self.cv.paint(box, lumen, hu["gastric_fluid"], within=self.cav)
                y_air = np.float32(cen[1] + semi[1] * (2 * air_level - 1))
                gas = lumen & (g.coords[1][box[1]][None, :, None] > y_air)
                self.cv.paint(box, gas, AIR_HU, within=self.cav)

    # ---- spleen; kidneys with cortex, medulla, sinus fat, in perirenal fat ----
    def paint_spleen_and_kidneys(self) -> None:
        u, g, hu, kx, ky, k, zc = self.u, self.grid, self.hu, self.kx, self.ky, self.k, self.zc
        self.fill(_ellipsoid(g, np.array([-92 * kx, -22 * ky, zc + 52]),
                             np.array([26, 45, 50]) * k, _rotation(u(30, 50), 0)),
                  hu["spleen"], within=self.wall_in)
        for side, dz in ((-1, u(0, 10)), (1, u(-20, -8))):
            cen = np.array([side * 70 * kx, self.yv - 2, zc + dz])
            rot = _rotation(side * u(25, 40), side * u(5, 15))
            semi = np.array([u(22, 26), u(27, 32), u(48, 58)]) * k
            self.fill(_ellipsoid(g, cen, semi * np.array([1.45, 1.35, 1.15]), rot),
                      hu["visceral_fat"] - 5, within=self.wall_in)
            kidney = _ellipsoid(g, cen, semi, rot)
            self.fill(kidney, hu["kidney_cortex"], within=self.wall_in)
            self.fill(kidney, hu["kidney_medulla"], level=0.45, within=self.wall_in)
            hilum = cen + np.array([-side * 0.55 * semi[0], 0.45 * semi[1], 0.0])  # anteromedial
            self.fill(_ellipsoid(g, hilum, np.array([8, 9, 18]) * k, rot), hu["visceral_fat"],
                      within=self.wall_in)

    # ---- colon (gas-filled tube) and small-bowel loops, some next to the pancreas ----
    def paint_bowel(self) -> None:
        g, rng, hu, kx, ky, k, zc = self.grid, self.rng, self.hu, self.kx, self.ky, self.k, self.zc
        pts = np.array([[78 * kx, 25 * ky, zc - 60], [75 * kx, 40 * ky, zc - 25],
                        [30 * kx, 70 * ky, zc - 22 + self.u(-8, 8)], [-30 * kx, 68 * ky, zc - 15],
                        [-78 * kx, 30 * ky, zc + 20], [-80 * kx, 10 * ky, zc - 50]])
        pts[:, :2] += rng.uniform(-5, 5, size=(len(pts), 2))
        cen, rad, _ = _catmull_rom(pts, rng.uniform(15, 22, size=len(pts)) * k, 3.0)
        colon = _tube(g, cen, rad)
        self.fill(colon, hu["bowel"] - 15, within=self.cav)
        self.fill(colon, hu["colon_gas"], level=0.75 ** 2, within=self.cav)
        loops = rng.uniform(size=(int(rng.integers(5, 10)), 7))
        for lp in loops:
            if lp[5] < 0.3:   # next to the pancreas body / tail
                cen = np.array([-(10 + 40 * lp[0]) * kx, (22 + 15 * lp[1]) * ky,
                                zc - 16 - 8 * lp[2]])
            else:             # lower anterior abdomen
                cen = np.array([(lp[0] - 0.5) * 120 * kx, (25 + 45 * lp[1]) * ky,
                                zc - 15 - 70 * lp[2]])
            semi = np.array([12 + 7 * lp[3], 10 + 6 * lp[4], 14 + 8 * lp[3]]) * k
            loop = _ellipsoid(g, cen, semi, _rotation(360 * lp[4], 30 * (lp[2] - 0.5)))
            self.fill(loop, hu["bowel"] + 5 * (lp[0] - 0.5), within=self.cav)
            if lp[3] > 0.5:
                self.fill(loop, 5 + 25 * lp[6], level=0.45, within=self.cav)

    # ---- pancreas centre line: head by the duodenum, body over the aorta, tail to the spleen ----
    def draw_pancreas_curve(self) -> None:
        u, rng, kx, ky, zc = self.u, self.rng, self.kx, self.ky, self.zc
        self.f_ap = u(0.7, 0.9)                           # antero-posterior flattening
        pts = np.array([[16 * kx, -12 * ky, zc - 21],     # uncinate process
                        [35 * kx, -2 * ky, zc - 10],      # head
                        [10 * kx, 14 * ky, zc + 1],       # neck (anterior to the SMV)
                        [-25 * kx, 11 * ky, zc + 7],      # body (anterior to aorta and spine)
                        [-66 * kx, -8 * ky, zc + 14]])    # tail (towards spleen / left kidney)
        self.panc_pts = pts + rng.uniform(-5, 5, size=(5, 3))
        self.panc_r = np.array([u(8, 11), u(11, 14), u(8, 10), u(9, 12), u(8, 12)])
        self.pc, pr, self.ps = _catmull_rom(self.panc_pts, self.panc_r, 1.0)
        wig = rng.uniform(0, 2 * math.pi, size=2)
        self.pr = pr + 0.8 * np.sin(self.ps / 9.0 + wig[0]) + 0.5 * np.sin(self.ps / 4.0 + wig[1])
        # arc length of each control point along the curve (for duct and tumour sites)
        self.cp_s = np.array([self.ps[np.argmin(np.linalg.norm(self.pc - p, axis=1))]
                              for p in self.panc_pts])

    # ---- duodenal C-loop around the head ----
    def paint_duodenum(self) -> None:
        rng, kx, ky, k, zc = self.rng, self.kx, self.ky, self.k, self.zc
        hx = self.panc_pts[1][0]
        pts = np.array([[hx - 20 * kx, 35 * ky, zc + 14], [hx + 14, 18 * ky, zc + 12],
                        [hx + 23, 2 * ky, zc - 4], [hx + 22, -2 * ky, zc - 28],
                        [hx - 5, 4 * ky, zc - 42], [-5 * kx, 8 * ky, zc - 47],
                        [-28 * kx, 10 * ky, zc - 38], [-42 * kx, 20 * ky, zc - 28]])
        pts[:, :2] += rng.uniform(-3, 3, size=(len(pts), 2))
        cen, rad, _ = _catmull_rom(pts, rng.uniform(9, 13, size=len(pts)) * k, 1.5)
        fluid = rng.random() < 0.5
        duo = _tube(self.grid, cen, rad)
        self.fill(duo, self.hu["duodenum"], within=self.cav)
        if fluid:
            self.fill(duo, self.hu["duodenal_fluid"], level=0.7 ** 2, within=self.cav)

    # ---- aorta, IVC, SMA, SMV, portal vein and the splenic vein behind the pancreas ----
    def paint_vessels(self) -> None:
        u, g, hu, kx, zs = self.u, self.grid, self.hu, self.kx, self.grid.coords[2]
        (ax, ay), r_ao = self.aorta_xy, u(10.5, 13)
        z_top, z_bot = float(zs[-1]) + 20, float(zs[0]) - 20
        tubes = [(np.array([[ax, ay, z_top], [ax - 2, ay + 2, z_bot]]),
                  np.array([r_ao, r_ao - 1.5]), hu["aorta"])]
        nx, ny, nz = self.panc_pts[2]
        y_smv = ny - self.panc_r[2] * self.f_ap - 5.5
        tubes += [
            (np.array([[nx - 1, y_smv, nz], [nx + 2, y_smv + 4, nz - 40],          # SMV
                       [nx + 4, y_smv + 10, nz - 100]]), np.array([6.5, 5.5, 4.5]),
             hu["portal_vein"]),
            (np.array([[nx - 1, y_smv, nz], [nx + 14, y_smv + 2, nz + 18],         # portal vein
                       [nx + 34 * kx, y_smv + 6, nz + 40]]), np.array([7.0, 7.5, 6.5]),
             hu["portal_vein"]),
            (np.array([[ax, ay + r_ao - 4, nz + 18], [nx - 14, y_smv + 2, nz - 8],  # SMA
                       [nx - 12, y_smv + 8, nz - 100]]), np.array([4.5, 4.0, 3.5]), hu["aorta"]),
        ]
        for pts, rad, value in tubes:
            cen, r, _ = _catmull_rom(pts, rad, 1.5)
            self.fill(_tube(g, cen, r), value)
        self.fill(_prism(g, self.ivc_xy, (u(11, 14), u(8, 10))), hu["ivc"])
        sel = self.ps >= self.cp_s[2] - 5
        sv = self.pc[sel] - np.array([0.0, 1.0, 0.0]) * (self.pr[sel] * self.f_ap + 2.0)[:, None]
        sv[:, 2] += 1.5
        self.fill(_tube(g, sv, np.full(len(sv), u(3.5, 5.0))), hu["portal_vein"])

    # ---- pancreas (label 1), main duct, tumour (label 2) ----
    def paint_pancreas(self) -> None:
        u, rng, g, hu, cp_s, ps = self.u, self.rng, self.grid, self.hu, self.cp_s, self.ps
        site = rng.random()            # tumour parameters are drawn always, used if has_tumour
        lo_s, hi_s = ((cp_s[0] + 3, cp_s[2]) if site < 0.6 else        # head / uncinate
                      (cp_s[2], cp_s[3] + 10) if site < 0.85 else      # neck / body
                      (cp_s[3] + 10, cp_s[4] - 6))                     # tail
        j_t = int(np.argmin(np.abs(ps - u(lo_s, max(lo_s, hi_s)))))
        r_t = self.tumour_radius = u(6, 15)
        n_lob, lob, lob_f = int(rng.integers(0, 3)), rng.standard_normal((2, 3)), rng.uniform(
            0.4, 0.7, size=2)
        duct_r, has_duct = u(1.0, 2.2), rng.random() < 0.5
        if self.hard:
            _HardLesions(self).paint(duct_r, has_duct)
            return
        pr = self.pr
        if self.has_tumour:  # the gland swells around the mass, so the mass stays inside it
            pr = np.maximum(pr, (r_t + 2.0) * np.exp(-((ps - ps[j_t]) / (1.2 * r_t + 6.0)) ** 2))
        pr = np.maximum(pr, 5.0)
        r = _tube(g, self.pc, pr, y_scale=self.f_ap)
        if r is None:
            return
        box, field_ = r
        panc = field_ <= 1
        self.cv.paint(box, panc, hu["pancreas"])
        self.cv.label[box][panc] = PANCREAS
        self.pancreas_voxels = int(panc.sum())
        sel = (ps > cp_s[1]) & (ps < cp_s[4] - 8)
        if has_duct and sel.sum() >= 2:
            d = _tube(g, self.pc[sel], np.full(int(sel.sum()), duct_r))
            if d is not None:
                self.cv.paint(d[0], (d[1] <= 1) & (self.cv.label[d[0]] == PANCREAS),
                              hu["pancreatic_duct"])
        if not self.has_tumour:
            return
        # main sphere plus up to two lobules, all inside the gland's sphere at the site (same
        # flattened metric), so every tumour voxel is a pancreas voxel
        c_t, r_gland = self.pc[j_t], float(pr[j_t])
        spheres = [(c_t, min(r_t, r_gland - 1.0))]
        for i in range(n_lob):
            r_i = min(lob_f[i] * r_t, r_gland - 1.0)
            dist = max(0.0, min(0.6 * r_t, r_gland - 1.0 - r_i))
            off = lob[i] / (np.linalg.norm(lob[i]) + 1e-9) * dist * np.array([1.0, self.f_ap, 1.0])
            spheres.append((c_t + off, r_i))
        for c_i, r_i in spheres:
            t = _tube(g, np.asarray(c_i)[None, :], np.array([r_i]), y_scale=self.f_ap)
            if t is not None:
                m = (t[1] <= 1) & (self.cv.label[t[0]] == PANCREAS)
                self.cv.paint(t[0], m, hu["tumour"])
                self.cv.label[t[0]][m] = TUMOUR
        self.tumour_voxels = int((self.cv.label[box] == TUMOUR).sum())


# --------------------------------------------------------------------------------------------
# Hard preset: cancer-like tumours, duct dilation with atrophy, and cyst mimics
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    """A lesion shape in unit space: a union of balls, each optionally deformed radially.

    Ball ``b`` holds the points ``p`` with ``|p - o_b| <= r_b * f(n)``, ``n`` the unit direction
    of ``p - o_b`` and ``f(n) = 1 + sum_k a_k cos(m_k * pi * (w_k . n) + phi_k)`` a smooth field on
    the sphere (``f = 1`` without waves).
    """

    kind: str                  # "lobulated" (2-5 balls) or "irregular" (one deformed ball)
    offsets: np.ndarray        # (n, 3)
    radii: np.ndarray          # (n,)
    waves: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # w, m, phi, a

    @staticmethod
    def draw(rng: np.random.Generator) -> _Shape:
        if rng.random() < 0.5:
            n = int(rng.integers(2, 6))
            dirs = rng.standard_normal((n, 3))
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-12
            dist, radii = rng.uniform(0.35, 0.8, size=n), rng.uniform(0.45, 0.8, size=n)
            dist[0], radii[0] = 0.0, 1.0
            return _Shape("lobulated", dirs * dist[:, None], radii)
        w = rng.standard_normal((3, 3))
        w /= np.linalg.norm(w, axis=1, keepdims=True) + 1e-12
        m = rng.integers(1, 4, size=3).astype(np.float64)
        phi = rng.uniform(0.0, 2 * math.pi, size=3)
        a = rng.uniform(0.2, 1.0, size=3)
        a *= rng.uniform(0.15, 0.35) / a.sum()              # total amplitude: f in [0.65, 1.35]
        return _Shape("irregular", np.zeros((1, 3)), np.ones(1), (w, m, phi, a))

    def extent(self) -> float:
        """Radius of a ball about the origin that holds the shape (unit space)."""
        amp = 0.0 if self.waves is None else float(self.waves[3].sum())
        return float(np.max(np.linalg.norm(self.offsets, axis=1) + self.radii * (1.0 + amp)))

    def inside(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        """Bool mask of the (broadcast) unit-space points inside the shape."""
        out: np.ndarray | None = None
        for o, r in zip(self.offsets, self.radii, strict=True):
            dx, dy, dz = ux - o[0], uy - o[1], uz - o[2]
            rho2 = dx * dx + dy * dy + dz * dz
            if self.waves is None:
                m = rho2 <= r * r
            else:
                rho = np.sqrt(rho2)
                inv = 1.0 / np.maximum(rho, 1e-6)
                f: np.ndarray | float = 1.0
                for wk, mk, pk, ak in zip(*self.waves, strict=True):
                    f = f + ak * np.cos(mk * math.pi * (dx * wk[0] + dy * wk[1] + dz * wk[2]) * inv + pk)
                m = rho <= r * f
            out = m if out is None else out | m
        assert out is not None
        return out

    def volume(self, n: int = 32) -> float:
        """Volume in unit space, counted on an ``n``^3 lattice over the bounding cube."""
        e = self.extent()
        c = (np.arange(n) + 0.5) / n * 2 * e - e
        inside = self.inside(c[:, None, None], c[None, :, None], c[None, None, :])
        return float(inside.sum()) * (2 * e / n) ** 3


@dataclass
class _Tumour:
    """One hard-preset tumour as drawn (world mm); ``centre`` is set once the gland is known."""

    site: str
    s: float                   # arc length of its site along the pancreas centre line, mm
    diameter: float            # equivalent diameter, mm
    contrast: float            # HU vs the parenchyma
    edge: bool
    obstructs: bool
    direction: np.ndarray      # random direction, made perpendicular to the centre line
    breach: float              # an edge tumour's centre lies breach x its radius inside the outline
    shape: _Shape
    scale: float = 1.0         # mm per unit-space unit (before the axes)
    axes: np.ndarray = field(default_factory=lambda: np.ones(3))
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def extent_mm(self) -> float:
        """Largest distance of the mass from its centre, mm."""
        return float(self.scale * self.shape.extent() * self.axes.max())


class _HardLesions:
    """Paints the pancreas of the hard preset: gland, ducts, tumours (label 2) and cysts (label 1).

    Parameters come from the anatomy's ``lesion_rng`` in a fixed order: the cyst first (so it is
    the same whether or not the case has a tumour), then the duct, then the tumours.
    """

    def __init__(self, anatomy: _Anatomy) -> None:
        self.an, self.cfg = anatomy, anatomy.config
        assert anatomy.lesion_rng is not None
        self.rng = anatomy.lesion_rng
        cp_s = anatomy.cp_s
        self.ranges = {"head": (cp_s[0] + 3, cp_s[2]), "body": (cp_s[2], cp_s[3] + 10),
                       "tail": (cp_s[3] + 10, cp_s[4] - 6)}
        self.s_end = float(cp_s[4] - 8)                   # tail end of the main duct
        # flattening of the masses like the gland's (antero-posterior), volume-preserving
        f = anatomy.f_ap
        self.axes = np.array([f ** (-1 / 3), f ** (2 / 3), f ** (-1 / 3)])

    def u(self, low: float, high: float) -> float:
        return _u(self.rng, low, high)

    def site_of(self, s: float) -> str:
        return "head" if s < self.ranges["head"][1] else "body" if s < self.ranges["body"][1] else "tail"

    def perpendicular(self, j: int, direction: np.ndarray) -> np.ndarray:
        """``direction`` without its component along the centre line at ``j``, unit length."""
        pc = self.an.pc
        t = pc[min(j + 1, len(pc) - 1)] - pc[max(j - 1, 0)]
        t = t / (np.linalg.norm(t) + 1e-12)
        d = direction - np.dot(direction, t) * t
        norm = np.linalg.norm(d)
        return d / norm if norm > 1e-6 else np.array([0.0, 1.0, 0.0])

    def gland_reach(self, pr_j: float, d: np.ndarray) -> float:
        """Distance from the centre line to the gland's outline along unit ``d`` (flattened tube)."""
        return float(pr_j / math.sqrt(d[0] ** 2 + (d[1] / self.an.f_ap) ** 2 + d[2] ** 2))

    def draw_tumour(self) -> _Tumour:
        cfg, rng = self.cfg, self.rng
        w = np.asarray(cfg.tumour_site_weights, dtype=np.float64)
        site = TUMOUR_SITES[int(rng.choice(len(TUMOUR_SITES), p=w / w.sum()))]
        lo, hi = self.ranges[site]
        s = self.u(lo, max(lo, hi))
        small = rng.random() < cfg.small_tumour_share
        d_lo, d_hi = cfg.tumour_diameter_mm
        if d_hi <= SMALL_TUMOUR_MM or d_lo >= SMALL_TUMOUR_MM:
            diameter = self.u(d_lo, d_hi)
        else:
            diameter = self.u(d_lo, SMALL_TUMOUR_MM) if small else self.u(SMALL_TUMOUR_MM, d_hi)
        contrast = self.u(*cfg.tumour_contrast_hu)
        edge = bool(rng.random() < cfg.edge_tumour_share)
        obstructs = bool(rng.random() < cfg.duct_dilation_probability)
        direction, breach = rng.standard_normal(3), self.u(0.1, 0.8)
        shape = _Shape.draw(rng)
        scale = ((math.pi / 6.0) * diameter ** 3 / shape.volume()) ** (1.0 / 3.0)
        return _Tumour(site, s, diameter, contrast, edge, obstructs, direction, breach, shape,
                       scale, self.axes)

    def paint(self, duct_r: float, has_duct: bool) -> None:
        """Draw this case's lesions, shape the gland around them and paint everything."""
        cfg, rng = self.cfg, self.rng
        # ---- draws, in a fixed order: cyst, duct, tumours ----
        has_cyst = rng.random() < cfg.cyst_probability
        s_c = self.u(self.ranges["head"][0], max(self.ranges["head"][0], self.ranges["tail"][1]))
        r_c, hu_c = 0.5 * self.u(*cfg.cyst_diameter_mm), self.u(0.0, 15.0)
        dir_c, off_c = rng.standard_normal(3), rng.random()
        d_duct, hu_duct = self.u(*cfg.dilated_duct_diameter_mm), self.u(0.0, 20.0)
        atrophy = self.u(*cfg.atrophy_radius_factor)
        second = rng.random() < cfg.second_tumour_probability
        tumours = [self.draw_tumour() for _ in range(1 + int(second))] if self.an.has_tumour else []
        if has_cyst:
            self.move_off_the_cyst(tumours, s_c, r_c)
        # the most downstream obstructing tumour with >= 10 mm of gland behind it blocks the duct
        for t in tumours:
            t.obstructs = t.obstructs and self.s_end - (t.s + t.extent_mm()) >= 10.0
        first = min((t for t in tumours if t.obstructs), key=lambda t: t.s, default=None)
        pr, r_duct, upstream = self.gland_radius(tumours, first, d_duct, atrophy)
        if has_cyst:
            pr = np.maximum(pr, (r_c + 1.5) / self.an.f_ap
                            * np.exp(-((self.an.ps - s_c) / (1.2 * r_c + 6.0)) ** 2))
        self.place(tumours, pr)
        j_c = int(np.argmin(np.abs(self.an.ps - s_c)))
        room = max(0.0, float(pr[j_c]) * self.an.f_ap - r_c - 1.0)   # the cyst stays round
        c_cyst = self.an.pc[j_c] + off_c * room * self.perpendicular(j_c, dir_c)
        # ---- painting: gland and ducts (1), tumours (2), cyst (1) ----
        if not self.paint_gland_and_ducts(pr, duct_r, has_duct):
            return
        if first is not None and upstream.sum() >= 2:
            self.paint_dilated_duct(first, r_duct, upstream, d_duct, hu_duct, atrophy)
        gland = self.an.cv.label == PANCREAS               # the gland's own outline, ducts included
        for t in tumours:
            self.paint_tumour(t, gland)
        if has_cyst:
            self.paint_cyst(c_cyst, r_c, hu_c, self.site_of(s_c))
        self.an.tumour_voxels = int((self.an.cv.label == TUMOUR).sum())

    def move_off_the_cyst(self, tumours: list[_Tumour], s_c: float, r_c: float) -> None:
        """A tumour on the cyst moves along the gland to just beside it, where there is room."""
        lo, hi = self.ranges["head"][0], max(self.ranges["head"][0], self.ranges["tail"][1])
        for t in tumours:
            gap = r_c + t.extent_mm() + 2.0
            if abs(t.s - s_c) < gap:
                free = [x for x in (s_c - gap, s_c + gap) if lo <= x <= hi]
                if free:
                    t.s = min(free, key=lambda x: abs(x - t.s))
                    t.site = self.site_of(t.s)

    def gland_radius(self, tumours: list[_Tumour], first: _Tumour | None, d_duct: float,
                     atrophy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gland radius along the centre line (mm), the dilated duct's radius and where it runs.

        Tail-ward of an obstruction the gland atrophies (keeping a 1.5 mm rim around the duct);
        it swells around an inner mass, which stays inside it, and half as much around an edge
        mass, which protrudes from it.
        """
        ps, f_ap = self.an.ps, self.an.f_ap
        pr = np.maximum(self.an.pr, 5.0)
        r_duct = np.zeros_like(ps)
        upstream = np.zeros(ps.shape, dtype=bool)
        if first is not None:
            s_a = first.s + first.extent_mm()
            pr = pr * (1.0 - (1.0 - atrophy) * np.clip((ps - s_a) / 10.0, 0.0, 1.0))
            upstream = (ps >= first.s) & (ps <= self.s_end)
            taper = np.clip((ps - first.s) / max(self.s_end - first.s, 1.0), 0.0, 1.0)
            r_duct = 0.5 * d_duct * (1.0 - 0.25 * taper)          # narrows a little to the tail
            pr = np.where(upstream, np.maximum(pr, (r_duct + 1.5) / f_ap), pr)
            pr = np.maximum(pr, 3.5)
        for t in tumours:
            e = t.extent_mm()
            peak = 0.5 * e if t.edge else e + 2.0
            pr = np.maximum(pr, peak * np.exp(-((ps - t.s) / (1.2 * e + 6.0)) ** 2))
        return pr, r_duct, upstream

    def place(self, tumours: list[_Tumour], pr: np.ndarray) -> None:
        """Centre each tumour: on the centre line, or (edge) ``breach`` radii inside the outline."""
        for t in tumours:
            j = int(np.argmin(np.abs(self.an.ps - t.s)))
            t.centre = self.an.pc[j].copy()
            if t.edge:
                d = self.perpendicular(j, t.direction)
                r_dir = 0.5 * t.diameter / math.sqrt(float(np.sum((d / t.axes) ** 2)))
                t.centre += max(0.0, self.gland_reach(float(pr[j]), d) - t.breach * r_dir) * d

    def paint_gland_and_ducts(self, pr: np.ndarray, duct_r: float, has_duct: bool) -> bool:
        """Paint the gland (label 1) and its normal main duct; False when it is off the grid."""
        an, cv = self.an, self.an.cv
        r = _tube(an.grid, an.pc, pr, y_scale=an.f_ap)
        if r is None:
            return False
        box, field_ = r
        panc = field_ <= 1
        cv.paint(box, panc, an.hu["pancreas"])
        cv.label[box][panc] = PANCREAS
        an.pancreas_voxels = int(panc.sum())
        sel = (an.ps > an.cp_s[1]) & (an.ps < an.cp_s[4] - 8)
        if has_duct and sel.sum() >= 2:
            d = _tube(an.grid, an.pc[sel], np.full(int(sel.sum()), duct_r))
            if d is not None:
                cv.paint(d[0], (d[1] <= 1) & (cv.label[d[0]] == PANCREAS), an.hu["pancreatic_duct"])
        return True

    def paint_dilated_duct(self, first: _Tumour, r_duct: np.ndarray, upstream: np.ndarray,  # noqa: PLR0917
                           d_duct: float, hu_duct: float, atrophy: float) -> None:
        """Fluid-filled dilated duct (label 1) from the obstructing mass to the tail."""
        an, cv = self.an, self.an.cv
        n_duct = 0
        d = _tube(an.grid, an.pc[upstream], r_duct[upstream])
        if d is not None:
            m = (d[1] <= 1) & (cv.label[d[0]] == PANCREAS)
            cv.paint(d[0], m, hu_duct)
            n_duct = int(m.sum())
        an.dilated_duct = {"diameter_mm": round(d_duct, 2), "hu": round(hu_duct, 1),
                           "length_mm": round(self.s_end - first.s, 1),
                           "atrophy_radius_factor": round(atrophy, 3), "voxels": n_duct}

    def paint_tumour(self, t: _Tumour, gland: np.ndarray) -> None:
        """Paint one mass (label 2): inside the gland, and for an edge mass also outside it in
        the soft tissue of the visceral cavity (not bone); at least the voxel nearest its centre."""
        an, g, cv = self.an, self.an.grid, self.an.cv
        value = an.hu["pancreas"] + t.contrast
        ext = t.scale * t.shape.extent() * t.axes
        n_t = n_out = 0
        tb = g.box(t.centre - ext, t.centre + ext)
        if tb is not None:
            dx, dy, dz = g.axes(tb, t.centre)
            k = (1.0 / (t.scale * t.axes)).astype(np.float32)
            mass = t.shape.inside(dx[:, None, None] * k[0], dy[None, :, None] * k[1],
                                  dz[None, None, :] * k[2])
            allowed = gland[tb]
            if t.edge:
                allowed = allowed | (an.cav[tb] & (cv.hu[tb] < 200.0))
            m = mass & allowed
            cv.paint(tb, m, value)
            cv.label[tb][m] = TUMOUR
            n_t, n_out = int(m.sum()), int((m & ~gland[tb]).sum())
        if n_t == 0:  # too small for the grid: the voxel nearest its centre is the tumour
            idx = np.rint((t.centre - g.origin) / g.spacing).astype(int)
            if np.all(idx >= 0) and np.all(idx < np.array(g.shape)):
                ix, iy, iz = (int(i) for i in idx)
                cv.hu[ix, iy, iz], cv.label[ix, iy, iz] = np.float32(value), TUMOUR
                n_t, n_out = 1, int(not gland[ix, iy, iz])
        an.lesions.append({
            "centre_mm": [round(float(v), 2) for v in t.centre],
            "equivalent_diameter_mm": round(t.diameter, 2), "contrast_hu": round(t.contrast, 1),
            "hu": round(value, 1), "site": t.site, "touches_edge": t.edge, "shape": t.shape.kind,
            "n_blobs": len(t.shape.radii), "obstructs_duct": t.obstructs, "voxels": n_t,
            "voxels_outside_gland": n_out})

    def paint_cyst(self, centre: np.ndarray, r_c: float, hu_c: float, site: str) -> None:
        """A round, water-dense cyst: label 1, painted only over gland (never over a tumour)."""
        an, cv = self.an, self.an.cv
        n_cyst = 0
        cyst = _ellipsoid(an.grid, centre, np.full(3, r_c))
        if cyst is not None:
            m = (cyst[1] <= 1) & (cv.label[cyst[0]] == PANCREAS)
            cv.paint(cyst[0], m, hu_c)
            n_cyst = int(m.sum())
        an.cysts.append({"centre_mm": [round(float(v), 2) for v in centre],
                         "diameter_mm": round(2 * r_c, 2), "hu": round(hu_c, 1), "site": site,
                         "voxels": n_cyst})

def _finish(hu: np.ndarray, grid: _Grid, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """Add texture, correlated noise and mild blur; round and clip to int16 HU."""
    hu += _smooth_field(grid, rng, lattice_mm=30.0, amplitude=4.0)
    # a mild scanner blur of ~0.8 mm in-plane, kept between 0.35 and 0.6 px; 0.35 px along z
    s_xy = float(np.clip(0.8 / grid.spacing[0], 0.35, 0.6))
    sigma = (s_xy, s_xy, 0.35)
    truncate = 3.0
    if noise_hu > 0:
        gain = np.prod([_kernel_noise_gain(s, truncate) for s in sigma])
        noise = rng.standard_normal(hu.shape, dtype=np.float32)
        noise *= np.float32(noise_hu / gain)
        hu += noise
        del noise
    out = ndimage.gaussian_filter(hu, sigma=sigma, truncate=truncate, mode="nearest")
    np.rint(out, out=out)
    np.clip(out, HU_MIN, HU_MAX, out=out)
    return out.astype(np.int16)


def _to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-store an RAS array as LPS: flip axes 0 and 1 and adjust the affine (same world)."""
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt("LPS"))
    flipped = np.ascontiguousarray(nib.orientations.apply_orientation(array, ornt))
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return flipped, new_affine.astype(np.float64)


def make_phantom(seed: int, config: PhantomConfig, store_non_ras: bool = False,
                 has_tumour: bool | None = None) -> PhantomCase:
    """Draw one synthetic case.

    Args:
        seed: any non-negative int; the same (seed, config) always gives identical arrays.
            Anatomy, grid and noise use separate streams, so changing only the spacing/shape
            configuration re-samples the same anatomy.
        config: drawing ranges.
        store_non_ras: store the arrays LPS (axes 0 and 1 flipped, affine adjusted) instead of
            RAS; the world-space anatomy is identical.
        has_tumour: ``None``: drawn with ``config.tumour_probability``; ``True``/``False``: the
            case has (has not) a tumour, everything else drawn as with ``None`` (how a data set
            with ``tumour_fraction`` fixes its tumour cases, :func:`dataset_case`). With the hard
            preset a tumour case has 1 or 2 tumours; cysts are drawn either way.

    Returns:
        :class:`PhantomCase` with HU int16 (X, Y, Z), label uint8 (X, Y, Z) and float64 affine.
        With the hard preset its ``meta`` also holds ``preset: "hard"``, ``lesions`` (one dict
        per tumour: ``centre_mm`` (RAS world, whatever the storage orientation),
        ``equivalent_diameter_mm``, ``contrast_hu`` (vs the parenchyma), ``hu``, ``site``
        (head/body/tail), ``touches_edge``, ``shape`` (lobulated/irregular), ``n_blobs``,
        ``obstructs_duct``, ``voxels``, ``voxels_outside_gland``), ``cysts`` (``centre_mm``,
        ``diameter_mm``, ``hu``, ``site``, ``voxels``) and ``dilated_duct`` (``None`` or
        ``diameter_mm``, ``hu``, ``length_mm``, ``atrophy_radius_factor``, ``voxels``).
    """
    ss = np.random.SeedSequence(int(seed))
    grid_ss, anat_ss, noise_ss, lesion_ss = ss.spawn(4)   # the 4th (hard lesions) leaves 1-3 as they were
    grid = _draw_grid(np.random.default_rng(grid_ss), config)
    hu_f, label, meta = _Anatomy(grid, np.random.default_rng(anat_ss), config, has_tumour,
                                 lesion_rng=np.random.default_rng(lesion_ss)).render()
    hu = _finish(hu_f, grid, np.random.default_rng(noise_ss), float(config.noise_hu))
    affine = grid.affine()
    if store_non_ras:
        hu, _ = _to_lps(hu, affine)
        label, affine = _to_lps(label, affine)
    meta.update({"seed": int(seed), "shape": list(hu.shape),
                 "spacing_mm": [float(s) for s in grid.spacing],
                 "orientation": "".join(nib.aff2axcodes(affine)), "synthetic": True})
    return PhantomCase(hu=hu, label=label, affine=affine, meta=meta)


# --------------------------------------------------------------------------------------------
# MSD-style data set on disk
# --------------------------------------------------------------------------------------------
def case_seed(seed: int, index: int) -> int:
    """Per-case seed from the data-set seed and the 0-based case index (order-independent)."""
    state = np.random.SeedSequence(int(seed), spawn_key=(int(index),)).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def non_ras_indices(n_train: int, n_test: int, non_ras_every: int) -> set[int]:
    """0-based case indices (training first, then test) that are stored LPS.

    Every ``non_ras_every``-th case; if that picks none and there are >= 2 cases, the last
    training case (or the last case when there are fewer than two training cases).
    """
    n = n_train + n_test
    if non_ras_every <= 0 or n < 1:
        return set()
    picked = {i for i in range(n) if (i + 1) % non_ras_every == 0}
    if not picked and n >= 2:
        picked = {n_train - 1 if n_train >= 2 else n - 1}
    return picked


def tumour_indices(n_train: int, n_test: int, config: PhantomConfig, seed: int) -> set[int] | None:
    """0-based case indices (training first, then test) that have a tumour, or ``None`` (drawn).

    ``None`` when ``config.tumour_fraction`` is ``None``: each case draws its own tumour with
    ``tumour_probability``. Otherwise exactly ``floor(n * tumour_fraction + 0.5)`` of the ``n_train``
    labelled cases and, separately, of the ``n_test`` unlabelled ones; which ones depends only on
    the counts, the fraction and ``seed`` (a permutation seeded with ``[seed, n_train, n_test]``).
    """
    if config.tumour_fraction is None:
        return None
    rng = np.random.default_rng([int(seed), int(n_train), int(n_test), 7])   # 7: this stream's tag
    picked: set[int] = set()
    for start, n in ((0, int(n_train)), (int(n_train), int(n_test))):
        k = int(math.floor(n * config.tumour_fraction + 0.5))
        picked |= {start + int(i) for i in rng.permutation(n)[:k]}
    return picked


def dataset_case(index: int, n_train: int, n_test: int, config: PhantomConfig, seed: int) -> PhantomCase:
    """Case ``index`` (0-based) of the data set :func:`write_synthetic_task07` writes with these
    settings: its case seed, storage orientation and (with ``tumour_fraction``) tumour, in memory."""
    tumours = tumour_indices(n_train, n_test, config, seed)
    return make_phantom(case_seed(seed, index), config,
                        store_non_ras=index in non_ras_indices(n_train, n_test, config.non_ras_every),
                        has_tumour=None if tumours is None else index in tumours)


def dataset_fingerprint(n_train: int, n_test: int, config: PhantomConfig, seed: int) -> str:
    """sha256 of everything that determines the written files (config, counts, seed, version)."""
    payload = {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION,
               "config": config.to_dict(), "n_train": int(n_train), "n_test": int(n_test),
               "seed": int(seed)}
    if config.preset != "easy":   # easy data sets keep the fingerprint they had before presets
        payload["preset_version"] = HARD_PRESET_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _existing_fingerprint(root: Path) -> str | None:
    try:
        meta = json.loads((root / "dataset.json").read_text())
        return str(meta["synthetic"]["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_stale_partials(root: Path) -> None:
    """Delete temporary siblings left by generator processes that no longer run."""
    prefix = f".{root.name}{_PARTIAL_TAG}"
    if not root.parent.is_dir():
        return
    for entry in root.parent.iterdir():
        if not (entry.name.startswith(prefix) and entry.is_dir()):
            continue
        try:
            pid = int(entry.name[len(prefix):].split("-", 1)[0])
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except (ValueError, PermissionError, OSError):
            alive = True  # unknown owner: leave it alone
        if not alive:
            logger.warning("Removing stale partial synthetic data set %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _reuse_existing(root: Path, fingerprint: str) -> bool:
    """True if ``root`` holds this exact data set; raise if it holds anything else."""
    if not root.exists():
        return False
    if root.is_dir() and _existing_fingerprint(root) == fingerprint:
        logger.info("Reusing SYNTHETIC phantom data set at %s (fingerprint %s matches)",
                    root, fingerprint[:12])
        return True
    if root.is_dir() and not any(root.iterdir()):
        return False  # an empty folder holds no data: it is replaced
    raise FileExistsError(
        f"{root} already exists and is not the synthetic data set requested (its fingerprint: "
        f"{_existing_fingerprint(root) or 'none'}, requested: {fingerprint}); refusing to "
        "overwrite existing data - remove the folder or choose another one")


def _write_case(folder: Path, index: int, n_train: int, config: PhantomConfig, seed: int,  # noqa: PLR0917
                store_non_ras: bool, has_tumour: bool | None = None) -> dict[str, Any]:
    """Draw case ``index`` (0-based) and write its file(s) under ``folder``; return its entries."""
    case_id, is_train = f"pancreas_{index + 1:03d}", index < n_train
    case = make_phantom(case_seed(seed, index), config, store_non_ras=store_non_ras, has_tumour=has_tumour)
    image_rel = f"./{'imagesTr' if is_train else 'imagesTs'}/{case_id}.nii.gz"
    save_nifti(folder / image_rel, case.hu, case.affine)
    entry = {"id": case_id, "split": "train" if is_train else "test",
             "orientation": case.meta["orientation"], "spacing_mm": case.meta["spacing_mm"],
             "shape": case.meta["shape"], "contrast_phase": case.meta["contrast_phase"]}
    written: dict[str, Any] = {"case": entry}
    if is_train:  # test cases keep their ground truth to themselves
        label_rel = f"./labelsTr/{case_id}.nii.gz"
        save_nifti(folder / label_rel, case.label, case.affine)
        written["training"] = {"image": image_rel, "label": label_rel}
        entry["tumour"] = bool(case.meta["tumour_voxels"] > 0)
        if config.preset == "hard":   # what was drawn, for analyses by size, contrast or site
            entry["lesions"] = case.meta["lesions"]
            entry["cysts"] = case.meta["cysts"]
    else:
        written["test"] = image_rel
    return written


def _write_cases(folder: Path, n_train: int, n_test: int, config: PhantomConfig, *, seed: int,  # noqa: PLR0917
                 progress: Callable[[int, int, str], None] | None, processes: int = 1) -> dict[str, Any]:
    """Write every case under ``folder``; return the dataset.json entries (file lists, cases).

    With ``processes`` > 1 the cases are drawn and written by that many worker processes; the
    files and entries are the same as with one (each case depends only on its own seed).
    """
    n = n_train + n_test
    lps = non_ras_indices(n_train, n_test, config.non_ras_every)
    tumours = tumour_indices(n_train, n_test, config, seed)

    def tumour(index: int) -> bool | None:
        return None if tumours is None else index in tumours

    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir()
    results: list[dict[str, Any] | None] = [None] * n
    if processes <= 1 or n == 1:
        for index in range(n):
            results[index] = _write_case(folder, index, n_train, config, seed, index in lps, tumour(index))
            if progress is not None:
                progress(index + 1, n, results[index]["case"]["id"])
    else:
        import multiprocessing  # noqa: PLC0415
        from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415

        pool = ProcessPoolExecutor(max_workers=min(int(processes), n),
                                   mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(_write_case, folder, index, n_train, config, seed, index in lps,
                                   tumour(index)): index
                       for index in range(n)}
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(done, n, results[futures[future]]["case"]["id"])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker writes into a removed folder
            raise
        pool.shutdown(wait=True)
    return {"training": [r["training"] for r in results if "training" in r],
            "test": [r["test"] for r in results if "test" in r],
            "cases": [r["case"] for r in results]}


def write_synthetic_task07(root: str | Path, n_train: int, n_test: int,  # noqa: PLR0917
                           config: PhantomConfig, seed: int,
                           progress: Callable[[int, int, str], None] | None = None,
                           processes: int = 1) -> Path:
    """Write (or reuse) a SYNTHETIC MSD Task07-style folder and return its path.

    Layout: ``root/dataset.json``, ``root/imagesTr/pancreas_NNN.nii.gz``,
    ``root/labelsTr/pancreas_NNN.nii.gz`` and ``root/imagesTs/pancreas_NNN.nii.gz`` (test: image
    only). Training cases are numbered 1..n_train, test cases n_train+1..n_train+n_test; case
    ``i`` (0-based) is ``make_phantom(case_seed(seed, i), config)``, stored LPS when ``i`` is in
    :func:`non_ras_indices`, with a tumour when ``i`` is in :func:`tumour_indices` if
    ``config.tumour_fraction`` is set (:func:`dataset_case`).

    The folder is built in a temporary sibling and renamed to ``root`` at the end, so an
    interrupted run never leaves a folder that looks complete. If ``root`` already holds a data
    set with the same fingerprint it is returned untouched; any other existing, non-empty
    ``root`` raises :class:`FileExistsError` (existing data is never overwritten).

    Args:
        progress: called as ``progress(i, n, case_id)`` after each case is written, i in 1..n
            (with several processes: the i-th case to finish, in any order).
        processes: worker processes that draw and write the cases (1: in this process). The
            files are the same whatever the number.

    Raises:
        FileExistsError: ``root`` exists and is not this exact synthetic data set.
        ValueError: negative counts or no cases at all.
    """
    if n_train < 0 or n_test < 0 or n_train + n_test < 1:
        raise ValueError(f"need n_train >= 0, n_test >= 0 and at least one case, got "
                         f"n_train={n_train}, n_test={n_test}")
    root = Path(root)
    fingerprint = dataset_fingerprint(n_train, n_test, config, seed)
    if _reuse_existing(root, fingerprint):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    logger.warning("Generating %d SYNTHETIC phantom CT cases (not patient data) into %s",
                   n_train + n_test, root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}{_PARTIAL_TAG}{os.getpid()}-",
                                dir=root.parent))
    try:
        written = _write_cases(tmp, n_train, n_test, config, seed=seed, progress=progress,
                               processes=processes)
        dataset = {
            "name": DATASET_NAME,
            "description": ("SYNTHETIC procedurally generated abdominal CT phantoms with pancreas "
                            "and pancreatic tumour labels, in the Medical Segmentation Decathlon "
                            "Task07 layout. Not patient data; for pipeline development and tests."),
            "reference": f"Generated by {GENERATOR_NAME} (no external source)",
            "licence": "CC-BY-SA 4.0 (synthetic data)",
            "release": f"synthetic-{GENERATOR_VERSION}",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": dict(MSD_DATASET_LABELS),
            "numTraining": n_train,
            "numTest": n_test,
            "training": written["training"],
            "test": written["test"],
            "synthetic": {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION,
                          "fingerprint": fingerprint, "seed": int(seed),
                          "config": config.to_dict(), "cases": written["cases"]},
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        try:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            os.rename(tmp, root)
        except OSError:
            if _existing_fingerprint(root) != fingerprint:
                raise FileExistsError(f"{root} appeared while generating and is not the requested "
                                      "synthetic data set; refusing to overwrite it") from None
            logger.info("Reusing SYNTHETIC phantom data set at %s written concurrently", root)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("SYNTHETIC phantom data set (%d train, %d test) ready at %s", n_train, n_test, root)
    return root
