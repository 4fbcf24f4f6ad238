"""The model lists: the one place that says which models the project trains and compares.

Importable without Keras (the pipeline registry, the CLI and inference use it).

* :data:`ARCHITECTURE_NAMES`: the registered architectures. Each is a Kedro namespace
  (``model_unet``, ``params:unet.architecture``) and a key of
  :data:`pancreas_seg.models.registry.ARCHITECTURES`, which must list the same names.
* :data:`CASCADE_NAME`: the coarse-to-fine cascade built from two registered architectures
  (:mod:`pancreas_seg.cascade`); its stage 1 is the model trained in namespace
  :data:`CASCADE_STAGE1`.
* :data:`MODEL_NAMES`: every model the study compares (the four architectures and the cascade).
"""

ARCHITECTURE_NAMES: tuple[str, ...] = ("unet", "unet_small", "fcn", "vnet2d")

CASCADE_NAME = "cascade"

CASCADE_STAGE1 = "unet"
"""The namespace whose trained model is the cascade's stage 1. Kedro wires pipelines before any
parameter is read, so this is code, not conf; any name of :data:`ARCHITECTURE_NAMES` works."""

MODEL_NAMES: tuple[str, ...] = (*ARCHITECTURE_NAMES, CASCADE_NAME)
