# Databricks notebook source
# MAGIC %md
# MAGIC # 3. Train a CNN and compare it with the Spark model
# MAGIC
# MAGIC A Keras CNN trained end to end on the images (`cxr_pipeline.cnn.train`), next to the Spark model of
# MAGIC notebook 2 (frozen pretrained features + logistic regression), scored on **the same test images**.
# MAGIC
# MAGIC The defaults are small (a few epochs of the small CNN at 128 px) so the notebook runs on a CPU in minutes;
# MAGIC on a GPU cluster raise `epochs`, `image_size`, or choose `cnn_model = inception_v3`.
# MAGIC Run notebook 2 first (or point `spark_run_uri` at any run of `jobs/train_featurizer.py`).

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

from cxr_pipeline.cnn import train as cnn_train
from cxr_pipeline.cnn.mlflow_run import log_cnn_run
from cxr_pipeline.infra import run_folder, storage
from cxr_pipeline.notebook_support import (
    agreement_table,
    cnn_test_scores,
    compare_models,
    counts_table,
    default_data_uri,
    default_runs_uri,
    display_or_save,
    get_param,
    join_scores,
    notebook_config,
    plot_roc_comparison,
    require,
    run_threshold,
    show_run_figures,
    show_table,
    spark_for_notebook,
    spark_test_scores,
    with_settings,
)

config = notebook_config(get_param("conf_env", "local", "Config environment (conf/<env>.yaml)"))
data_uri = require("data_uri", get_param("data_uri", default_data_uri(config), "Dataset root (chest_xray folder URI)"))
runs = get_param("runs_uri", default_runs_uri(config, data_uri), "Folder the notebooks write their runs and predictions to (URI)")
cnn_run_uri = get_param("cnn_run_uri", runs + "/notebook_cnn", "CNN run folder to write (URI)")
overwrite = get_param("overwrite", True, "Replace this notebook's earlier CNN run at cnn_run_uri (only a run folder)")
spark_run_uri = get_param("spark_run_uri", runs + "/notebook_featurizer", "Spark run to compare with (notebook 2)")
register = get_param("register", False, "Register the model in the MLflow registry (may move its champion alias)")
config = with_settings(config, {
    "tracking.register": register,
    "cnn.model": get_param("cnn_model", "small_cnn", "CNN: small_cnn | inception_v3"),
    "cnn.epochs": get_param("epochs", 3, "Epochs"),
    "cnn.image_size": get_param("image_size", 128, "Image size (pixels, square)"),
    "cnn.batch_size": get_param("batch_size", 16, "Batch size"),
    "cnn.verbose": 2,   # one line per epoch: progress bars do not render in a notebook log
})
storage.configure(config)
print(f"data {data_uri}\nCNN run {cnn_run_uri} ({config['cnn']['model']}, {config['cnn']['epochs']} epoch(s), "
      f"{config['cnn']['image_size']} px)\ncompared with Spark run {spark_run_uri}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Train the CNN
# MAGIC Validation is carved from the training images by patient (as for the Spark model); the decision threshold
# MAGIC is chosen on it for the same target sensitivity.

# COMMAND ----------

started = time.time()
cnn_metrics = cnn_train.train_and_evaluate(config, data_uri, cnn_run_uri, overwrite=overwrite)
log_cnn_run(config, cnn_metrics, cnn_run_uri, data_uri, started_at=started)  # MLflow trouble only warns
show_table(counts_table(cnn_metrics), "cnn_images_per_subset")
show_run_figures(cnn_run_uri, ["training_curves.png", "roc.png", "confusion_matrix.png"], prefix="cnn_")

# COMMAND ----------

# MAGIC %md
# MAGIC ## The two models on the same test images
# MAGIC Each model at its own validation-chosen threshold and at 0.5. Only images both models scored are compared.

# COMMAND ----------

if not storage.exists(spark_run_uri.rstrip("/") + "/classifier.json"):
    raise FileNotFoundError(f"no Spark run at {spark_run_uri}: run notebook 2 first or set the spark_run_uri widget")
run_folder.require_complete(spark_run_uri)  # a half-written run is refused, not compared

spark = spark_for_notebook(config)
scores = {"Spark LR on backbone features": spark_test_scores(spark, spark_run_uri), "CNN": cnn_test_scores(cnn_run_uri)}
thresholds = {"Spark LR on backbone features": run_threshold(spark_run_uri), "CNN": run_threshold(cnn_run_uri)}
joined = join_scores(scores)
print(f"{len(joined)} test images scored by both models "
      f"(Spark model: {len(scores['Spark LR on backbone features'])}, CNN: {len(scores['CNN'])})")
show_table(compare_models(joined, thresholds), "model_comparison")

# COMMAND ----------

display_or_save(plot_roc_comparison(joined, list(thresholds)), "roc_comparison")
show_table(agreement_table(joined, thresholds), "agreement")
show_table(joined, "test_scores_both_models")
