"""The architecture list: the one place that says which models the project trains and compares.

Importable without Keras (the pipeline registry, the CLI and inference use it). Each name is a
Kedro namespace (``unet.model``, ``params:unet.architecture``) and a key of
:data:`pancreas_seg.models.registry.ARCHITECTURES`, which must list the same names.
"""

ARCHITECTURE_NAMES: tuple[str, ...] = ("unet", "unet_small", "fcn", "vnet2d")
