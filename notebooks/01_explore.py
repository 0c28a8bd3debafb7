# Databricks notebook source
# MAGIC %md
# MAGIC # 1. Explore the chest X-ray images
# MAGIC
# MAGIC What is in the `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}` tree before training on it:
# MAGIC
# MAGIC * how many images per split and class (the classes are unbalanced, and `val` is tiny in the Kermany set),
# MAGIC * what the images look like,
# MAGIC * their pixel sizes and **file sizes** (NORMAL files are several times larger than PNEUMONIA files:
# MAGIC   a shortcut a model could learn instead of the lungs),
# MAGIC * junk and corrupt files, which the pipeline excludes and reports rather than losing silently.
# MAGIC
# MAGIC All the logic is in the `cxr_pipeline` library (`cxr_pipeline.notebook_support.exploration`); this notebook only calls it.
# MAGIC On Databricks set the widgets at the top; locally the same parameters come from `CXR_<NAME>` environment
# MAGIC variables (see `python -m cxr_pipeline.notebook_support.runner --help`).

# COMMAND ----------

# Where the wheel is installed (or locally, PYTHONPATH=lib) this import just works; in a Databricks
# Git folder the package is the repository's lib/ next to this notebooks/ folder.
import os
import sys

try:
    import cxr_pipeline  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "lib")))

from cxr_pipeline.notebook_support import (
    default_data_uri,
    display_or_save,
    exploration,
    get_param,
    notebook_config,
    require,
    show_table,
    spark_description,
    spark_for_notebook,
)

config = notebook_config(get_param("conf_env", "local", "Config environment (conf/<env>.yaml)"))
data_uri = require("data_uri", get_param("data_uri", default_data_uri(config), "Dataset root (chest_xray folder URI)"))
source = get_param("source", config["data"]["source"], "Reader: binaryFile | parquet (a packed table)")
samples_per_class = get_param("samples_per_class", 4, "Sample images per class")

spark = spark_for_notebook(config)
print(f"data: {data_uri} (reader: {source}); {spark_description(spark)}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Read the tree and measure every image
# MAGIC One row per image: split, class, file size, width x height, and whether it decodes with the same decoder
# MAGIC the training uses. The reader's own rejections (hidden files, wrong extensions, zero-byte files, bad magic
# MAGIC bytes) come back next to it.

# COMMAND ----------

overview = exploration.dataset_overview(spark, data_uri, source=source)
print(f"{len(overview.stats)} image files read, {len(overview.good)} decode, {len(overview.rejected)} rejected by the reader")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Images per split and class

# COMMAND ----------

counts = exploration.counts_by_split_class(overview.stats)
show_table(counts.reset_index(), "counts_per_split_class")
display_or_save(exploration.plot_counts(counts), "counts_per_split_class")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Sample images per class

# COMMAND ----------

undecodable = overview.stats.loc[overview.stats["error"].notna(), "path"]
samples = exploration.sample_images(overview.images, per_class=samples_per_class, exclude=undecodable)
display_or_save(exploration.plot_sample_grid(samples), "sample_images")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Image size and file size
# MAGIC The two classes come from different sources and were compressed differently: compare the file sizes.
# MAGIC `file size AUC` is how well "smaller file = PNEUMONIA" alone separates the classes (0.5 = no shortcut).

# COMMAND ----------

show_table(exploration.size_summary(overview.stats), "size_summary")
display_or_save(exploration.plot_size_distributions(overview.stats), "size_distributions")
ratio = exploration.file_size_ratio(overview.stats)
auc = exploration.file_size_separability(overview.stats)
print(f"median NORMAL file / median PNEUMONIA file: {ratio:.2f}x" if ratio else "file size ratio: needs both classes")
print(f"file size AUC (smaller file = PNEUMONIA): {auc:.3f}" if auc is not None else "file size AUC: needs both classes")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Junk and corrupt files
# MAGIC Everything that will not be used for training, and why.

# COMMAND ----------

problems = exploration.problem_files(overview)
show_table(problems, "problem_files")
print(f"{len(problems)} file(s) excluded" if len(problems) else "no junk or corrupt files found")
