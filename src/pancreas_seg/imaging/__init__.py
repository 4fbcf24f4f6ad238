"""Pure NumPy/nibabel imaging code: NIfTI I/O and geometry, HU intensity, resizing, phantoms.

Nothing in this package imports Kedro, Keras or MLflow.
"""
