"""Spark building blocks shared by the jobs: images in, features out. ``session`` builds the
SparkSession from the ``spark:`` config section; ``reader`` reads a ``chest_xray``-style tree
(``binaryFile``, Spark's ``image`` source, DICOM, or a packed table) into path/split/label/content
rows plus the rejected files; ``packing`` writes that tree as one Parquet image table;
``featurizer`` is ``ImageFeaturizer``, the persisted pyspark.ml Transformer from image bytes to
backbone features (and ``FeaturizerSettings``, the ``featurizer:`` config section); ``_udf`` is its
worker half, run inside the Python workers (model built once per worker, decode -> predict loop,
GPU pinning). Pixel decoding itself is Spark-free, in :mod:`cxr_pipeline.images.decode`.
"""
