"""Chest X-ray pneumonia pipeline: HDFS storage, Spark featurization, Keras models."""

__version__ = "0.1.0"
