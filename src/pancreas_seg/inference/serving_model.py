"""MLflow "models from code" entry point: the pyfunc model that :mod:`pancreas_seg.inference.serving` logs.

MLflow runs this file when it loads a logged model, so the model is rebuilt from code rather than
unpickled (no cloudpickle of project objects in the artifact store).
"""

import mlflow

from pancreas_seg.inference.serving import SegmentationModel

mlflow.models.set_model(SegmentationModel())
