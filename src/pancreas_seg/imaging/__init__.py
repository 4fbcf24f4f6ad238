"""Pure NumPy/nibabel imaging code: NIfTI I/O and geometry, HU intensity, resizing.

The synthetic phantom generator lives in :mod:`pancreas_seg.phantoms` (a simulator, not I/O).

Nothing in this package imports Kedro, Keras or MLflow.
"""
