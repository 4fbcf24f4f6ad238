"""Architecture names, importable without Keras (the pipeline registry and CLI use them)."""

ARCHITECTURE_NAMES: tuple[str, ...] = ("unet", "unet_small", "fcn", "vnet2d")
