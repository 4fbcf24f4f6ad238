"""The Medical Segmentation Decathlon Task07_Pancreas dataset: layout, validation, archives, splits.

Pure Python/NumPy/nibabel; no Kedro imports.
"""
