"""Training-side code independent of Kedro: losses, per-class Dice metrics and data feeding.

Everything here uses ``keras`` / ``keras.ops`` only, so it runs under the TensorFlow, JAX and
PyTorch backends.
"""
