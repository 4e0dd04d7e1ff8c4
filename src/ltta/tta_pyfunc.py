"""The ``ltta-tta`` pyfunc model as MLflow "models from code": this file is logged with the model
and run when it is loaded, so the registry stores no pickled object (nothing to unpickle from a
file that travelled between machines); the state comes from the artifacts and the model config.
See :mod:`ltta.serving`."""

from mlflow.models import set_model

from ltta.serving import LearnedTTAModel

set_model(LearnedTTAModel())
