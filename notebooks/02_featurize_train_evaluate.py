# Databricks notebook source
# MAGIC %md
# MAGIC # 2. Featurize, train and evaluate the Spark model
# MAGIC
# MAGIC The project's main job, step by step, with the library doing the work (`cxr_pipeline.spark.classifier.training`):
# MAGIC
# MAGIC 1. read the image tree (junk is rejected and listed),
# MAGIC 2. featurize every image with a pretrained Keras backbone inside a Spark ML `Transformer`
# MAGIC    (`ImageFeaturizer`, a pandas UDF), cached as Parquet,
# MAGIC 3. fit `StandardScaler` + `LogisticRegression` on the training images (validation carved out by patient),
# MAGIC 4. choose the decision threshold on validation for a target sensitivity,
# MAGIC 5. evaluate on the test images and write a run folder (model, metrics, figures).
# MAGIC
# MAGIC The saved `PipelineModel` (featurizer + scaler + classifier) scores raw images; notebook 4 uses it.

# COMMAND ----------

# Where the wheel is installed (or locally, PYTHONPATH=lib) this import just works; in a Databricks
# Git folder the package is the repository's lib/ next to this notebooks/ folder.
import os
import sys
import time

try:
    import cxr_pipeline  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "lib")))

from pyspark.ml import Pipeline

from cxr_pipeline.infra import storage
from cxr_pipeline.notebook_support import (
    counts_table,
    default_data_uri,
    default_runs_uri,
    describe_pipeline,
    get_param,
    metrics_table,
    notebook_config,
    require,
    show_run_figures,
    show_table,
    spark_description,
    spark_for_notebook,
    spark_test_scores,
    threshold_table,
    with_settings,
)
from cxr_pipeline.spark.classifier import training
from cxr_pipeline.spark.classifier.mlflow_run import log_spark_run

config = notebook_config(get_param("conf_env", "local", "Config environment (conf/<env>.yaml)"))
data_uri = require("data_uri", get_param("data_uri", default_data_uri(config), "Dataset root (chest_xray folder URI)"))
runs = get_param("runs_uri", default_runs_uri(config, data_uri), "Folder the notebooks write their runs and predictions to (URI)")
run_uri = get_param("run_uri", runs + "/notebook_featurizer", "Run folder to write (URI)")
overwrite = get_param("overwrite", True, "Replace this notebook's earlier run at run_uri (only a run folder)")
register = get_param("register", False, "Register the model in the MLflow registry (may move its champion alias)")
config = with_settings(config, {
    "tracking.register": register,
    "featurizer.model_name": get_param("model_name", config["featurizer"]["model_name"], "Backbone"),
    "featurizer.feature_layer": get_param("feature_layer", config["featurizer"]["feature_layer"],
                                          "Feature layer (empty = last; mixed5 for InceptionV3)"),
    "featurizer.weights": get_param("weights", config["featurizer"]["weights"],
                                    "Backbone weights: empty = provisioned (make weights), imagenet, or a .weights.h5 path"),
    "featurizer.image_size": get_param("backbone_image_size", config["featurizer"].get("image_size"),
                                       "Backbone input size in pixels (empty = the backbone's own, 299)", cast=int),
    "featurizer.batch_size": get_param("batch_size", config["featurizer"]["batch_size"], "Images per model call"),
    "training.target_sensitivity": get_param("target_sensitivity", config["training"]["target_sensitivity"],
                                             "Target sensitivity on validation"),
    "training.tuning": get_param("tuning", config["training"]["tuning"], "Tuning: none | cv | tvs"),
})

spark = spark_for_notebook(config)
storage.configure(config)
print(f"data {data_uri}\nrun  {run_uri}\nbackbone {config['featurizer']['model_name']} "
      f"layer {config['featurizer']['feature_layer'] or '(last)'}; {spark_description(spark)}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## The Pipeline
# MAGIC The featurizer is a Spark ML `Transformer` with Params; the classifier is a regular Spark ML `Pipeline`.
# MAGIC After fitting, the three stages are saved together as one `PipelineModel`.

# COMMAND ----------

featurizer = training.build_featurizer(training.FeaturizerSettings.from_config(config))
settings = training.TrainingSettings.from_config(config)
classifier_pipeline, _ = training.build_classifier(settings, weighted=settings.class_weighting)
pipeline = Pipeline(stages=[featurizer, *classifier_pipeline.getStages()])
show_table(describe_pipeline(pipeline), "pipeline_stages")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Train
# MAGIC Featurizing is the expensive part (a CNN forward pass per image); the features are cached, so running this
# MAGIC cell again with other classifier settings reuses them.

# COMMAND ----------

started = time.time()
result = training.train(spark, config, data_uri, run_uri, overwrite=overwrite)
print(result.summary)
# also an MLflow run (on Databricks: this notebook's experiment), a registry version with `register`; only warns
log_spark_run(config, result, data_uri, spark, started_at=started)

# COMMAND ----------

show_table(describe_pipeline(result.model), "fitted_pipeline_model")
show_table(counts_table(result.metrics), "images_per_subset")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Metrics
# MAGIC Sensitivity = recall on PNEUMONIA, specificity = recall on NORMAL. The threshold is chosen on the validation
# MAGIC images to reach the target sensitivity; 0.5 is shown for comparison.

# COMMAND ----------

show_table(metrics_table(result.metrics), "metrics")

# COMMAND ----------

# MAGIC %md
# MAGIC ## ROC, precision-recall and confusion matrix (test)

# COMMAND ----------

show_run_figures(run_uri, ["roc.png", "pr.png", "confusion_matrix.png"])

# COMMAND ----------

# MAGIC %md
# MAGIC ## Threshold trade-off: sensitivity vs specificity
# MAGIC Lowering the threshold catches more pneumonia (sensitivity up) at the price of more false alarms on
# MAGIC normal images (specificity down).

# COMMAND ----------

show_run_figures(run_uri, ["threshold.png"])
test_scores = spark_test_scores(spark, run_uri)
show_table(threshold_table(test_scores["label"], test_scores["score"]), "threshold_tradeoff")
show_table(test_scores, "test_scores")
