"""The file MLflow stores with every logged model ("models from code").

MLflow copies this file into the model folder and runs it when the model is loaded; it
only names the class to instantiate, so loading never unpickles anything.
"""

import mlflow

from anomaly_flow.tracking.pyfunc import GlowPyfunc

mlflow.models.set_model(GlowPyfunc())
