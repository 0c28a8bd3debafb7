"""The Keras CNN path: a tf.data pipeline over the chest_xray tree (local or HDFS),
the seeds' from-scratch CNN and InceptionV3 transfer learning, training with
callbacks on CPU or all local GPUs, Spark-free prediction and Grad-CAM.

Modules: ``data`` (listing, decoding, tf.data), ``models`` (architectures),
``train`` (devices, fit, outputs), ``predict`` (LocalCnnClassifier), ``gradcam``.

Importing it imports TensorFlow, through ``tensorflow_runtime`` (its start-up notices kept off the console).
"""

from ..models.tensorflow_runtime import import_tensorflow

import_tensorflow()
