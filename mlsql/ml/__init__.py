"""Training and using models on Arrow tables: options, encoding, estimators, metrics.

The engine hands :func:`train` an Arrow table (features + label after TRANSFORM);
nothing here knows SQL or which engine produced the data.
"""

from mlsql.ml.features import FeatureSpec, encode, encoded_names
from mlsql.ml.model import TrainedModel, train
from mlsql.ml.options import MODEL_TYPES, Options, resolve_options

__all__ = ["FeatureSpec", "MODEL_TYPES", "Options", "TrainedModel", "encode", "encoded_names",
           "resolve_options", "train"]
