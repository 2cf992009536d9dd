"""The models with no label, kmeans and pca: what ML.PREDICT, ML.EVALUATE and their own functions
give, on top of the estimators of ``mlsql.ml.kmeans`` and ``mlsql.ml.pca``. Every column of the
training query is a feature (a kmeans model's ``kmeans_init_col`` excepted); ``label`` is None."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import TrainingError, UnknownColumnError
from mlsql.ml import kmeans as K
from mlsql.ml import metrics as M
from mlsql.ml import pca as P
from mlsql.ml.features import encode, fit_features
from mlsql.ml.model import TRAINING_INFO_SCHEMA, TrainedModel, _find


class UnsupervisedModel(TrainedModel):
    """What kmeans and pca share: no label, no classes, one estimator module (``K`` or ``P``) that
    predicts, evaluates and finds anomalies on the encoded matrix."""

    task_name = ""
    module = None

    def predict(self, features: pa.Table, threshold: float | None = None) -> pa.Table:
        return self.module.predictions(self.estimator, self.encode(features))

    def evaluation_of(self, table: pa.Table, threshold: float | None = None) -> M.Evaluation:
        return self.module.evaluation(self.estimator, self.encode(table))

    def explain_predict(self, features: pa.Table, top_k: int = 5) -> pa.Table:
        return self.estimator.contributions(None)  # says what to use instead

    def detect_anomalies(self, features: pa.Table, contamination: float) -> pa.Table:
        return self.module.detect_anomalies(self.estimator, self.encode(features), contamination)

    def prediction_schema(self, func: str = "PREDICT") -> pa.Schema:
        if func == "GENERATE_EMBEDDING":
            return P.EMBEDDING_SCHEMA
        return self.module.ANOMALY_SCHEMA if func == "DETECT_ANOMALIES" else self._prediction_schema()

    def _prediction_schema(self) -> pa.Schema:
        raise NotImplementedError

    @classmethod
    def trained(cls, opts, specs, est, history: list[dict], n: int, metrics: dict) -> UnsupervisedModel:
        """The model of a fitted estimator (either engine's), its metrics those of the training rows."""
        return cls(model_type=opts.model_type, task=cls.task_name, label=None, label_type=None, classes=None,
                   features=specs, estimator=est, eval_metrics=metrics,
                   training_info=pa.Table.from_pylist(history, schema=TRAINING_INFO_SCHEMA),
                   options=opts.given, n_train=n, n_eval=0)


class KMeansModel(UnsupervisedModel):
    """A trained kmeans model: ML.PREDICT gives each row's cluster, ML.EVALUATE how tight and apart
    the clusters are, ML.CENTROIDS what they are, ML.DETECT_ANOMALIES the rows far from all of them."""

    task_name = "clustering"
    module = K

    def _prediction_schema(self) -> pa.Schema:
        return K.PREDICTION_SCHEMA

    def graph_outputs(self) -> list[str]:
        """The exported graph's outputs ML.PREDICT is made from (mlsql.export.graph)."""
        return ["centroid_distances"]

    def predictions_from_outputs(self, outs: dict) -> pa.Table:
        """ML.PREDICT's columns from the exported graph's outputs (a device's answer)."""
        return K.predictions_of(np.asarray(outs["centroid_distances"]).reshape(-1, len(self.estimator.centroids)))

    def centroids(self, standardize: bool = False) -> pa.Table:
        return K.centroids_table(self.estimator, self.features, standardize)

    @classmethod
    def train(cls, table: pa.Table, opts, progress=None) -> KMeansModel:
        init_col = None
        if opts.kmeans_init_col:
            init_col = _find(table, opts.kmeans_init_col)
            if init_col is None:
                raise UnknownColumnError(opts.kmeans_init_col, table.column_names,
                                         message=f"kmeans_init_col '{opts.kmeans_init_col}' is not a column of the "
                                                 "training query")
        names = [c for c in table.column_names if c != init_col]
        if not names:
            raise TrainingError("The training query has no feature columns")
        specs = fit_features(table, names, "onehot")
        X = encode(table, specs)
        init_rows = None
        if init_col is not None:
            init_rows = pc.fill_null(table.column(init_col).cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
        est = K.KMeansEstimator()
        history = est.fit(X, opts, specs, init_rows, progress)
        return cls.trained(opts, specs, est, history, len(X), K.evaluation(est, X).metrics)


class PCAModel(UnsupervisedModel):
    """A trained pca model: ML.PREDICT projects rows on its components, ML.PRINCIPAL_COMPONENTS and
    ML.PRINCIPAL_COMPONENT_INFO describe them, ML.DETECT_ANOMALIES finds rows they rebuild badly."""

    task_name = "dimensionality_reduction"
    module = P

    def _prediction_schema(self) -> pa.Schema:
        return pa.schema([(n, pa.float64()) for n in P.column_names(len(self.estimator.components))])

    def graph_outputs(self) -> list[str]:
        """The exported graph's outputs ML.PREDICT is made from (mlsql.export.graph)."""
        return ["principal_components"]

    def predictions_from_outputs(self, outs: dict) -> pa.Table:
        """ML.PREDICT's columns from the exported graph's outputs (a device's answer)."""
        return P.predictions_of(np.asarray(outs["principal_components"]).reshape(-1, len(self.estimator.components)))

    def generate_embedding(self, features: pa.Table) -> pa.Table:
        return P.embeddings(self.estimator, self.encode(features))

    def components(self) -> pa.Table:
        return P.components_table(self.estimator, self.features)

    def component_info(self) -> pa.Table:
        return P.component_info(self.estimator)

    @classmethod
    def train(cls, table: pa.Table, opts, progress=None) -> PCAModel:
        specs = fit_features(table, list(table.column_names), "onehot")
        if not specs:
            raise TrainingError("The training query has no feature columns")
        X = encode(table, specs)
        est = P.PCAEstimator()
        history = est.fit(X, opts, specs, progress)
        return cls.trained(opts, specs, est, history, len(X), P.evaluation(est).metrics)
