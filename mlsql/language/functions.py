"""The language's functions as data: the ML table functions and the TRANSFORM functions, each with
how it is written and what it gives. Read by the parser (which names are ML functions), the
runtime (each has a handler), completion and the extension's vocabulary. No sqlglot here:
``%load_ext mlsql`` reads it."""

from __future__ import annotations

# ML.<name>(...) table functions: how each is written and what it gives (completion shows both; the
# runtime's mlsql.runtime.steps.ml_functions.ML_FUNCTIONS runs each)
ML_FUNCTIONS: dict[str, tuple[str, str]] = {
    "PREDICT": ("ML.PREDICT(MODEL m, TABLE t | (query) [, STRUCT(0.5 AS threshold | 'd' AS device | 3 AS trial_id)])",
                "Predictions: predicted_<label> (and predicted_<label>_probs for classifiers), then the input "
                "columns; kmeans: CENTROID_ID and NEAREST_CENTROIDS_DISTANCE; pca: principal_component_1..k. "
                "With STRUCT('d' AS device) the rows are predicted on that device."),
    "EVALUATE": ("ML.EVALUATE(MODEL m [, TABLE t | (query)] [, STRUCT(0.5 AS threshold | 3 AS trial_id)])",
                 "One row of metrics: precision, recall, accuracy, f1_score, log_loss, roc_auc for classifiers; "
                 "mean_absolute_error, mean_squared_error, r2_score... for regressors; davies_bouldin_index, "
                 "mean_squared_distance for kmeans; total_explained_variance_ratio for pca. Without input: the "
                 "held-out split's metrics from training (kmeans, pca: the training rows')."),
    "EXPLAIN_PREDICT": ("ML.EXPLAIN_PREDICT(MODEL m, TABLE t | (query) [, STRUCT(k AS top_k_features | 3 AS trial_id)])",
                        "The prediction with top_feature_attributions (SHAP values for trees, coef x (x - mean) "
                        "for linear models), baseline_prediction_value, prediction_value, approximation_error."),
    "FEATURE_IMPORTANCE": ("ML.FEATURE_IMPORTANCE(MODEL m)",
                           "feature, importance_weight, importance_gain, importance_cover (tree models)."),
    "TRAINING_INFO": ("ML.TRAINING_INFO(MODEL m)",
                      "One row per iteration: iteration, loss, eval_loss, learning_rate, duration_ms."),
    "TRIAL_INFO": ("ML.TRIAL_INFO(MODEL m)",
                   "A tuned model's trials: trial_id, hyperparameters, hparam_tuning_evaluation_metrics (on the "
                   "evaluation rows), training_loss, eval_loss, status, error_message, is_optimal."),
    "CONFUSION_MATRIX": ("ML.CONFUSION_MATRIX(MODEL m, TABLE t | (query) [, STRUCT(0.5 AS threshold)])",
                         "expected_label and one column per predicted label."),
    "ROC_CURVE": ("ML.ROC_CURVE(MODEL m, TABLE t | (query))",
                  "threshold, recall, false_positive_rate and the counts (binary classifiers)."),
    "CENTROIDS": ("ML.CENTROIDS(MODEL m [, STRUCT(TRUE AS standardize)])",
                  "A kmeans model's centroids: centroid_id, feature, numerical_value (numbers), categorical_value "
                  "(strings: category, value = the share of the cluster's rows in it); standardize: the "
                  "standardized values."),
    "DETECT_ANOMALIES": ("ML.DETECT_ANOMALIES(MODEL m [, STRUCT(0.02 AS contamination | 0.95 AS anomaly_prob_threshold)] "
                         "[, TABLE t | (query)])",
                         "The input rows with is_anomaly and their score: kmeans, normalized_distance (the distance "
                         "to the nearest centroid over that centroid's median training distance) and CENTROID_ID; "
                         "pca, mean_squared_error (of the row rebuilt from its principal components); a row is an "
                         "anomaly when its score passes the training rows' (1 - contamination) quantile. arima_plus: "
                         "the history (no input) or new rows with is_anomaly, lower_bound, upper_bound, "
                         "anomaly_probability (above anomaly_prob_threshold)."),
    "GENERATE_EMBEDDING": ("ML.GENERATE_EMBEDDING(MODEL m, TABLE t | (query))",
                           "A pca model's embedding of each row: ml_generate_embedding_result, an ARRAY<DOUBLE> of "
                           "its k principal components (ML.PREDICT's principal_component_1..k as one column), "
                           "then the input columns."),
    "PRINCIPAL_COMPONENTS": ("ML.PRINCIPAL_COMPONENTS(MODEL m)",
                             "A pca model's components: principal_component_id, feature, numerical_value "
                             "(numbers), categorical_value (strings: category, value)."),
    "PRINCIPAL_COMPONENT_INFO": ("ML.PRINCIPAL_COMPONENT_INFO(MODEL m)",
                                 "One row per principal component: principal_component_id, eigenvalue, "
                                 "explained_variance_ratio, cumulative_explained_variance_ratio."),
    "WEIGHTS": ("ML.WEIGHTS(MODEL m [, STRUCT(TRUE AS standardize)])",
                "A linear or logistic model's coefficients: processed_input, weight (numbers), category_weights "
                "(strings: category, weight), __INTERCEPT__; standardize: the weights of standardized inputs."),
    "DEVICE_METRICS": ("ML.DEVICE_METRICS('device')",
                       "Per model on the device: version, requests, rows, error_rate, p50/p95/p99 ms, throughput, "
                       "providers really used, input statistics."),
    "DEVICE_DATA": ("ML.DEVICE_DATA('device' | 'group' [, MODEL m] [, STRUCT(TIMESTAMP '...' AS since, n AS max_rows)])",
                    "What devices were fed and answered (deploys with sample_rate > 0): device, model, version, "
                    "request_id, predicted_at, provider, latency_ms, the inputs, the predictions, and label, "
                    "label_at once an outcome arrived."),
    "PROFILE": ("ML.PROFILE(MODEL m [, STRUCT('d' AS device, [1, 32] AS batch_sizes, 50 AS runs, 'cpu' AS provider)])",
                "The model's ONNX graph run with ONNX Runtime's profiler, in-process or on a device: per operator "
                "node, op_type, provider, batch_size, calls, total_ms, mean_ms, share_of_time; summary rows "
                "session_load_ms, mean_ms, p50_ms, p95_ms, peak_rss_mb, model_size_bytes (in value)."),
    # time series (arima_plus; docs/LANGUAGE.md, Time series)
    "FORECAST": ("ML.FORECAST(MODEL m [, STRUCT(30 AS horizon, 0.9 AS confidence_level)])",
                 "An arima_plus model's forecast per series: the series id columns, forecast_timestamp, "
                 "forecast_value, standard_error, confidence_level, prediction_interval_lower_bound, "
                 "prediction_interval_upper_bound."),
    "EXPLAIN_FORECAST": ("ML.EXPLAIN_FORECAST(MODEL m [, STRUCT(30 AS horizon, 0.9 AS confidence_level)])",
                         "History and forecast of an arima_plus model, decomposed: time_series_timestamp, "
                         "time_series_type ('history' | 'forecast'), time_series_data, time_series_adjusted_data, "
                         "standard_error, the interval, trend, seasonal_period_<yearly|...|hourly>, "
                         "spikes_and_dips, residual."),
    "ARIMA_EVALUATE": ("ML.ARIMA_EVALUATE(MODEL m)",
                       "One row per series of an arima_plus model: non_seasonal_p, non_seasonal_d, non_seasonal_q, "
                       "has_drift, log_likelihood, AIC, variance, seasonal_periods, has_holiday_effect, "
                       "has_spikes_and_dips, has_step_changes, error_message."),
    "ARIMA_COEFFICIENTS": ("ML.ARIMA_COEFFICIENTS(MODEL m)",
                           "One row per series of an arima_plus model: ar_coefficients, ma_coefficients, "
                           "intercept_or_drift."),
    "FEATURES_AT": ("ML.FEATURES_AT(view, TABLE t | (SELECT key, at, ... FROM ...))",
                    "Each probe row with the feature view's features as of its time `at`: every feature "
                    "aggregates the view's events with the row's key and at - window <= time <= at (both "
                    "ends included, nothing after at); probe rows in their order."),
    "JOB_RUNS": ("ML.JOB_RUNS(['job'])", "The runs of scheduled jobs: start, end, status, error, output notebook."),
    "VALIDATE_DATA_SKEW": (
        "ML.VALIDATE_DATA_SKEW(MODEL m, TABLE t | (query) [, STRUCT(0.3 AS categorical_default_threshold, "
        "'L_INFTY' AS categorical_metric_type, 0.3 AS numerical_default_threshold, "
        "'JENSEN_SHANNON_DIVERGENCE' AS numerical_metric_type, [('col', 0.1)] AS thresholds)])",
        "Training-serving skew per model input: input, metric, threshold, value, is_anomaly. The serving "
        "rows are compared with the training statistics stored with the model (L-infinity distance for "
        "categories, Jensen-Shannon divergence, log base 2, over the training histogram's bins for numbers)."),
    "VALIDATE_DATA_DRIFT": (
        "ML.VALIDATE_DATA_DRIFT(TABLE base | (query), TABLE study | (query) [, STRUCT(10 AS num_histogram_buckets, "
        "0.3 AS categorical_default_threshold, 'L_INFTY' AS categorical_metric_type, "
        "0.3 AS numerical_default_threshold, [('col', 0.1)] AS thresholds)])",
        "Drift between two sets of rows, per column they share: input, metric, threshold, value, is_anomaly "
        "(as VALIDATE_DATA_SKEW, the first set being the baseline)."),
    "DESCRIBE_DATA": (
        "ML.DESCRIBE_DATA(TABLE t | (query) [, STRUCT(2 AS num_quantiles, 1 AS top_k)])",
        "One row per column: name, num_rows, num_nulls, num_zeros, min, max, mean, stddev, median, quantiles, "
        "unique, avg_string_length, num_values, top_values."),
    "COMPARE_MODELS": (
        "ML.COMPARE_MODELS(['m1', 'm2@3', 'm3@champion'], TABLE t | (query) [, STRUCT(0.5 AS threshold, "
        "'roc_auc' AS order_by)])",
        "Several models evaluated on the same rows, one row each, best first: model, name, version, model_type, "
        "rank, then ML.EVALUATE's metrics (columns a model has no value for are NULL); charts the main metrics "
        "side by side (and the ROC curves of binary classifiers)."),
    "EXPERIMENT_RESULTS": ("ML.EXPERIMENT_RESULTS('experiment')",
                           "An experiment's readout, one row per arm and metric: arm, model, metric, test, n, value, "
                           "ci_low, ci_high, delta_vs_control, relative_delta, p_value, significant, samples_needed, "
                           "and the sample-ratio check (srm_p_value, trustworthy)."),
    "ALERT_HISTORY": ("ML.ALERT_HISTORY(['alert'])",
                      "One row per check of an alert: checked_at, status, rows, fired, notified, attempts, error, "
                      "preview of the first rows."),
}
# Functions whose first argument is not a model (DEVICE_DATA takes MODEL m later, optionally).
NO_MODEL_FUNCTIONS = ("DEVICE_METRICS", "DEVICE_DATA", "JOB_RUNS", "VALIDATE_DATA_DRIFT", "DESCRIBE_DATA",
                      "ALERT_HISTORY", "COMPARE_MODELS", "EXPERIMENT_RESULTS",
                      "FEATURES_AT")
# Functions that read two inputs (TABLE t | (query)), the first being the baseline.
TWO_INPUT_FUNCTIONS = ("VALIDATE_DATA_DRIFT",)


# The TRANSFORM functions of CREATE MODEL ... TRANSFORM (ML.STANDARD_SCALER(x) OVER () AS x, ...):
# words of the language, fitted by the planner (mlsql.plan.transform's fitters cover exactly these).
TRANSFORM_FUNCTIONS: dict[str, tuple[str, str]] = {
    "STANDARD_SCALER": ("ML.STANDARD_SCALER(x) OVER ()", "TRANSFORM: (x - mean) / stddev, fitted on the training rows."),
    "MIN_MAX_SCALER": ("ML.MIN_MAX_SCALER(x) OVER ()", "TRANSFORM: (x - min) / (max - min), capped to [0, 1]."),
    "MAX_ABS_SCALER": ("ML.MAX_ABS_SCALER(x) OVER ()", "TRANSFORM: x / max(abs(x))."),
    "BUCKETIZE": ("ML.BUCKETIZE(x, [b1, b2, ...])", "TRANSFORM: 'bin_1' for x < b1, 'bin_2' for b1 <= x < b2, ..."),
    "QUANTILE_BUCKETIZE": ("ML.QUANTILE_BUCKETIZE(x, n) OVER ()", "TRANSFORM: BUCKETIZE on the n-quantiles."),
    "IMPUTER": ("ML.IMPUTER(x, 'mean' | 'median' | 'most_frequent') OVER ()", "TRANSFORM: COALESCE(x, statistic)."),
    "LABEL_ENCODER": ("ML.LABEL_ENCODER(x [, top_k, frequency_threshold]) OVER ()",
                      "TRANSFORM: 1..k in alphabetical order, 0 for NULL or unknown."),
    "ONE_HOT_ENCODER": ("ML.ONE_HOT_ENCODER(x [, drop, top_k, frequency_threshold]) OVER ()",
                        "TRANSFORM: the category (rare or unknown: NULL), one-hot encoded by the model."),
}
