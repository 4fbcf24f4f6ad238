"""The cascade on one scan (the predictor's two-stage path): HU volume (X, Y, Z) in any axis order -> labels on the same grid.

1. Stage 1 segments the body-framed whole slices (the project's one preprocessing path).
2. Its pancreas (main 3D components) gives a box on the source slices; an empty stage 1 ends here
   with an empty mask and a warning.
3. Stage 2 runs only on the slices of that box (plus ``z_margin_mm``) and only on the in-plane box
   (plus ``margin_mm``), resampled to ``crop.spacing_mm``; a region wider than the stage-2 input is
   covered by overlapping tiles whose probabilities are averaged.
4. The predictor maps stage 2's probabilities back onto the file's voxel grid through the crop
   geometry's inverse (:func:`predict_cascade` returns model-grid outputs; :func:`merge_stages`
   combines them once they are on the file's grid).
5. Predicted tumour components smaller than ``min_tumour_volume_mm3`` become pancreas (a lesion too
   small to report; chosen on validation cases, see ``conf/base/parameters_cascade.yml``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pancreas_seg.cascade.crops import CropConfig, CropGeometry, locate_pancreas, tile_starts
from pancreas_seg.core.labels import (
    PANCREAS,
    PANCREAS_REGION,
    TUMOUR,
    output_channels,
    probabilities_to_labels,
)
from pancreas_seg.evaluation.postprocessing import remove_small_components
from pancreas_seg.imaging.intensity import ForegroundIntensityStats
from pancreas_seg.imaging.preprocess import (
    PreprocessingConfig,
    preprocess_crop_image,
    preprocess_image,
)
from pancreas_seg.inference.forward import ModelGridOutput, predict_slices
from pancreas_seg.inference.model_card import ModelCard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cascade:
    """Two loaded Keras models and the settings that tie them together.

    A fold ensemble of cascades (nnU-Net's way: one box from the stage-1 fold ensemble, then the
    stage-2 fold ensemble on that crop) holds a tuple of models in each stage; each stage's
    softmax outputs are averaged.

    Attributes:
        stage1: whole-slice model (input ``preprocessing.image_size_px``), localises the pancreas;
            or a tuple of them (the stage-1 fold models).
        stage2: crop model (input ``crop.size_px``), segments background / pancreas / tumour; or a
            tuple of them (the stage-2 fold models, in the same order).
        preprocessing: the preprocessing both stages were trained with (intensity, 2.5D context).
        stage1_label_mode: stage 1's label mode (``multiclass`` or ``pancreas``).
        stage2_label_mode: stage 2's label mode (``multiclass``, ``pancreas`` or ``tumour``).
        crop: the crop settings stage 2 was trained with.
        stats: training-foreground intensity statistics (z-score mode), else None.
        min_tumour_volume_mm3: smaller predicted tumour components are relabelled pancreas, mm³.
    """

    stage1: Any
    stage2: Any
    preprocessing: PreprocessingConfig
    stage1_label_mode: str
    stage2_label_mode: str
    crop: CropConfig
    stats: ForegroundIntensityStats | None = None
    min_tumour_volume_mm3: float = 0.0

    def __post_init__(self) -> None:
        if self.stage1_label_mode == "tumour":
            raise ValueError("a cascade's stage 1 must localise the pancreas: its label mode must be "
                             "multiclass or pancreas, not tumour")

    @classmethod
    def from_card(cls, card: ModelCard, stage1: Any, stage2: Any) -> Cascade:
        """The cascade a cascade model card describes, with its two loaded models."""
        if card.cascade is None:
            raise ValueError(f"{card.describe()} is not a cascade")
        spec = card.cascade
        return cls(stage1=stage1, stage2=stage2, preprocessing=card.preprocessing_config,
                   stage1_label_mode=spec.stage1_label_mode, stage2_label_mode=spec.stage2_label_mode,
                   crop=CropConfig.from_params(dict(spec.crop)), stats=card.foreground_stats,
                   min_tumour_volume_mm3=spec.min_tumour_volume_mm3)


    @classmethod
    def from_cards(cls, cards: list[ModelCard], stage1: list[Any], stage2: list[Any]) -> Cascade:
        """The fold ensemble of the cascades ``cards`` describe (member k: ``stage1[k]``, ``stage2[k]``).

        Raises:
            ValueError: the members differ in what ties their stages together (crop, label modes,
                preprocessing, minimum tumour volume), so their outputs cannot be averaged.
        """
        members = [cls.from_card(card, one, two) for card, one, two in zip(cards, stage1, stage2, strict=True)]
        first = members[0]
        for card, member in zip(cards[1:], members[1:], strict=False):
            if (member.preprocessing, member.stage1_label_mode, member.stage2_label_mode, member.crop,
                    member.min_tumour_volume_mm3) != (first.preprocessing, first.stage1_label_mode,
                                                      first.stage2_label_mode, first.crop, first.min_tumour_volume_mm3):
                raise ValueError(f"{card.describe()}: the cascades of an ensemble must share the crop, label modes, "
                                 "preprocessing and minimum tumour volume")
        return cls(stage1=tuple(stage1), stage2=tuple(stage2), preprocessing=first.preprocessing,
                   stage1_label_mode=first.stage1_label_mode, stage2_label_mode=first.stage2_label_mode,
                   crop=first.crop, stats=first.stats, min_tumour_volume_mm3=first.min_tumour_volume_mm3)

    @property
    def stage1_models(self) -> tuple[Any, ...]:
        """The stage-1 model(s), as a tuple."""
        return tuple(self.stage1) if isinstance(self.stage1, (tuple, list)) else (self.stage1,)

    @property
    def stage2_models(self) -> tuple[Any, ...]:
        """The stage-2 model(s), as a tuple."""
        return tuple(self.stage2) if isinstance(self.stage2, (tuple, list)) else (self.stage2,)


def _mean(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.mean(np.stack(arrays), axis=0).astype(np.float32)


def background_probabilities(label_mode: str) -> np.ndarray:
    """The (C,) model output that means certain background in ``label_mode``."""
    fill = np.zeros(output_channels(label_mode), dtype=np.float32)
    if label_mode == "multiclass":
        fill[0] = 1.0
    return fill


def predict_tiled(model: Any, crop_image: np.ndarray, tile_hw: tuple[int, int], overlap: float,
                  context_slices: int, batch_size: int = 16, flip_tta: bool = False) -> np.ndarray:
    """Stage-2 probabilities (Z, H, W, C) float32 of a crop (Z, H, W) >= one tile in H and W.

    Tiles of ``tile_hw`` (the model input) cover the crop with about ``overlap``; where they overlap
    the probabilities are averaged.
    """
    _, height, width = crop_image.shape
    if height < tile_hw[0] or width < tile_hw[1]:
        raise ValueError(f"crop {crop_image.shape[1:]} is smaller than the stage-2 input {tile_hw}")
    total = None
    counts = np.zeros((height, width), dtype=np.float32)
    for top in tile_starts(height, tile_hw[0], overlap):
        for left in tile_starts(width, tile_hw[1], overlap):
            tile = crop_image[:, top:top + tile_hw[0], left:left + tile_hw[1]]
            probabilities = predict_slices(model, tile, context_slices, batch_size, flip_tta)
            if total is None:
                total = np.zeros((*crop_image.shape, probabilities.shape[-1]), dtype=np.float32)
            total[:, top:top + tile_hw[0], left:left + tile_hw[1]] += probabilities
            counts[top:top + tile_hw[0], left:left + tile_hw[1]] += 1
    return total / counts[None, :, :, None]


def predict_cascade(cascade: Cascade, hu: np.ndarray, affine: np.ndarray, batch_size: int = 16,
                    flip_tta: bool = False, name: str = "scan") -> tuple[list[ModelGridOutput], dict[str, Any]]:
    """Both stages on raw CT (X, Y, Z) HU, any axis order -> model-grid outputs and a report.

    A fold ensemble of cascades averages each stage's members: one box from the mean stage-1
    softmax, then the mean stage-2 softmax on that one crop. The outputs are stage 2's probabilities
    on the crop's model grid (padded to the whole slice
    plane with certain background) and, in stage-2 ``tumour`` mode, stage 1's on the whole-slice
    grid: the pancreas comes from stage 1 there. None when stage 1 finds no pancreas. The
    predictor maps them back to the file's grid and :func:`merge_stages` makes the labels. The
    report says whether stage 1 found the pancreas, its box (canonical source voxels), the slices
    and tiles stage 2 ran on.
    """
    config = cascade.preprocessing
    image, geometry = preprocess_image(hu, affine, config, cascade.stats)
    stage1_probabilities = _mean([predict_slices(model, image, config.context_slices, batch_size, flip_tta)
                                  for model in cascade.stage1_models])
    stage1_labels = probabilities_to_labels(stage1_probabilities, cascade.stage1_label_mode)
    box = locate_pancreas(stage1_labels, geometry, cascade.crop.min_component_fraction)
    if box is None:
        logger.warning("%s: stage 1 found no pancreas; the cascade returns an empty mask", name)
        return [], {"stage1_found": False, "stage2_slices": 0}
    crop = CropGeometry.plan(hu.shape, affine, box, cascade.crop)
    crop_image = preprocess_crop_image(hu, crop, config, cascade.stats)
    probabilities = _mean([predict_tiled(model, crop_image, cascade.crop.size_px, cascade.crop.tile_overlap,
                                         config.context_slices, batch_size, flip_tta)
                           for model in cascade.stage2_models])
    outputs = [ModelGridOutput(crop.full_model_grid(probabilities, background_probabilities(cascade.stage2_label_mode)),
                               crop.scan, cascade.stage2_label_mode)]
    if cascade.stage2_label_mode == "tumour":   # stage 2 adds the tumour to stage 1's pancreas
        outputs.append(ModelGridOutput(stage1_probabilities, geometry, cascade.stage1_label_mode))
    n_tiles = (len(tile_starts(crop.region_hw[0], cascade.crop.size_px[0], cascade.crop.tile_overlap))
               * len(tile_starts(crop.region_hw[1], cascade.crop.size_px[1], cascade.crop.tile_overlap)))
    return outputs, {"stage1_found": True, "stage1_box": box.to_list(), "stage2_slices": crop.crop_shape[0],
                     "stage2_region_hw": list(crop.region_hw), "stage2_tiles": n_tiles}


def merge_stages(cascade: Cascade, file_labels: list[np.ndarray], shape: tuple[int, ...],
                 affine: np.ndarray) -> tuple[np.ndarray, int]:
    """The cascade's uint8 labels of ``shape`` from its outputs mapped to the file's grid, and the
    number of tumour components too small to report (relabelled pancreas).

    ``file_labels`` are :func:`predict_cascade`'s outputs on the file's grid, in order: stage 2,
    then (tumour mode) stage 1. None: stage 1 found no pancreas, an empty mask.
    """
    if not file_labels:
        return np.zeros(shape, dtype=np.uint8), 0
    labels = file_labels[0]
    if cascade.stage2_label_mode == "tumour":
        pancreas = np.isin(file_labels[1], PANCREAS_REGION)
        labels = np.where(labels == TUMOUR, TUMOUR, np.where(pancreas, PANCREAS, 0)).astype(np.uint8)
    return remove_small_components(labels, TUMOUR, cascade.min_tumour_volume_mm3,
                                   abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))), PANCREAS)
