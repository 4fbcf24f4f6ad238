"""Kedro datasets for NIfTI volumes, DICOM files, NumPy arrays, Keras models, model cards and figures (thin, fsspec-based).

Use them in ``conf/*/catalog.yml`` as ``pancreas_seg.datasets.NiftiDataset`` and so on.
"""

from pancreas_seg.datasets.dicom_dataset import DicomDataset
from pancreas_seg.datasets.figure_dataset import FigureDataset
from pancreas_seg.datasets.keras_model_dataset import KerasModelDataset
from pancreas_seg.datasets.model_card_dataset import ModelCardDataset
from pancreas_seg.datasets.nifti_dataset import NiftiDataset, PredictionDataset
from pancreas_seg.datasets.numpy_dataset import NumpyDataset
from pancreas_seg.datasets.optional_partitions import OptionalPartitionedDataset

__all__ = ["DicomDataset", "FigureDataset", "KerasModelDataset", "ModelCardDataset", "NiftiDataset", "NumpyDataset",
           "OptionalPartitionedDataset", "PredictionDataset"]
