"""The project's smallest shared pieces: label meanings, atomic writes, process-wide runtime
settings and the warning filters. Pure Python, no Kedro, MLflow or Keras at import time."""
