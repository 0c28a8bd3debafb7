"""The Spark-classifier path: InceptionV3 features on the executors, then a Spark ML
``StandardScaler -> LogisticRegression`` pipeline, evaluated and exported for Spark-free scoring.

It is the sibling of :mod:`cxr_pipeline.cnn` (the Keras CNN path); both read the same image
tree, carve the same patient-grouped validation split and write the same run-folder shape.

Modules: ``training`` (read -> featurize into the feature cache -> split -> fit -> threshold;
called by ``jobs/train_featurizer.py``), ``evaluation`` (Spark evaluators, metrics.json,
figures, model card), ``model_export`` (``classifier.json`` and ``LocalClassifier``, the
Spark-free scorer used by the service and ``cxr-predict-image``), ``prediction`` (batch
scoring of new images with a saved run; called by ``jobs/predict.py``).
"""
