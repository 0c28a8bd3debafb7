# Databricks notebook source
# MAGIC %md
# MAGIC # 4. Score new images with a saved model
# MAGIC
# MAGIC * A **Spark run** (notebook 2 / `jobs/train_featurizer.py`): the saved `PipelineModel` scores a whole folder
# MAGIC   of images on the cluster (`cxr_pipeline.spark.classifier.prediction.predict_images`, as `jobs/predict.py` does) and writes
# MAGIC   `predictions.parquet`; files that are not images are listed with the reason, never dropped silently.
# MAGIC   The same run's Spark-free export (`classifier.json`) is checked against it on a few images.
# MAGIC * A **CNN run** (notebook 3 / `jobs/train_cnn.py`): scored on the driver with `LocalCnnClassifier`.
# MAGIC
# MAGIC `images_uri` can be any folder (any depth, any layout): the images need no labels.

# COMMAND ----------

# Where the wheel is installed (or locally, PYTHONPATH=lib) this import just works; in a Databricks
# Git folder the package is the repository's lib/ next to this notebooks/ folder.
import os
import sys

try:
    import cxr_pipeline  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "lib")))

from cxr_pipeline.infra import storage
from cxr_pipeline.infra.tables import read_table
from cxr_pipeline.notebook_support import (
    default_data_uri,
    default_runs_uri,
    display_or_save,
    get_param,
    notebook_config,
    plot_predictions,
    probability_gap,
    require,
    score_files_local,
    show_table,
    spark_for_notebook,
)
from cxr_pipeline.serving.predict_image import is_cnn_model, load_classifier
from cxr_pipeline.spark.classifier.prediction import predict_images

config = notebook_config(get_param("conf_env", "local", "Config environment (conf/<env>.yaml)"))
data_uri = require("data_uri", get_param("data_uri", default_data_uri(config), "Dataset root (its test folder is the default input)"))
runs = get_param("runs_uri", default_runs_uri(config, data_uri), "Folder the notebooks write their runs and predictions to (URI)")
model_uri = get_param("model_uri", runs + "/notebook_featurizer", "Saved run folder (Spark or CNN run)")
images_uri = get_param("images_uri", data_uri.rstrip("/") + "/test", "Folder of images to score (URI)")
out_uri = get_param("out_uri", runs + "/notebook_predictions", "Where to write the predictions (URI)")
overwrite = get_param("overwrite", True, "Replace earlier predictions at out_uri (only a predictions folder)")
threshold = get_param("threshold", None, "Decision threshold (empty = the run's validation-chosen one)", cast=float)
preview = get_param("preview", 8, "Images to show")
storage.configure(config)
kind = "CNN" if is_cnn_model(model_uri) else "Spark"
print(f"{kind} model {model_uri}\nimages {images_uri}\nout {out_uri}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Score

# COMMAND ----------

if kind == "Spark":
    spark = spark_for_notebook(config)
    summary = predict_images(spark, model_uri, images_uri, out_uri, csv=True, threshold=threshold, overwrite=overwrite)
    print(f"scored {summary.scored} image(s) {summary.by_class}; unreadable {summary.unreadable}")
    predictions = read_table(summary.files["parquet"]).sort_values("path", ignore_index=True)  # any run's table
else:
    scored = score_files_local(load_classifier(model_uri), images_uri, threshold=threshold)
    predictions = scored.drop(columns="content").rename(columns={"label_name": "predicted_class"})
    storage.write_bytes(out_uri.rstrip("/") + "/predictions.csv", predictions.to_csv(index=False).encode())
show_table(predictions, "predictions")

# COMMAND ----------

# MAGIC %md
# MAGIC ## A look at some of them
# MAGIC Scored again without Spark, from the run's export: the probabilities must match the cluster's.

# COMMAND ----------

local = score_files_local(load_classifier(model_uri), images_uri, limit=preview, threshold=threshold)
display_or_save(plot_predictions(local, title=f"{kind} model: predictions"), "predictions_preview")
compared, gap = probability_gap(local, predictions)
print(f"{compared} image(s) scored both ways; largest probability difference {gap:.2e}")
if local["probability"].notna().any():
    assert compared > 0 and gap < 1e-3, "the Spark-free scores disagree with the batch scores"
