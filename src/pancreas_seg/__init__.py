"""pancreas_seg: 2D pancreas and pancreatic-tumour segmentation of abdominal CT (MSD Task07)."""

__version__ = "0.1.0"
