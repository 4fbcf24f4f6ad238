"""The coarse-to-fine cascade: stage 1 localises the pancreas, stage 2 segments a fine crop around it.

* :mod:`~pancreas_seg.cascade.crops`: the pancreas box and the crop geometry (forward and inverse,
  built on :class:`~pancreas_seg.imaging.geometry.ScanGeometry`).
* :mod:`~pancreas_seg.cascade.localisation`: stage-1 localisation errors, measured on validation
  cases, that set the position jitter of stage-2 training crops.
* :mod:`~pancreas_seg.cascade.sampler`: the stage-2 training loader (tumour-guaranteed crops).
The cascade on one scan (file grid in, file grid out) is the predictor's two-stage path,
:mod:`pancreas_seg.inference.cascade`. Pure NumPy/SciPy, plus Keras where a model is trained; no Kedro.
"""
