"""Grad-CAM (Selvaraju et al., 2017): where in the image the CNN looked.

The gradient of the PNEUMONIA score with respect to the last convolutional
feature map, averaged per channel, weights that map; the ReLU of the weighted
sum, upsampled to the input size and scaled to [0, 1], is the heat map.
"""

from __future__ import annotations

import numpy as np

from . import models


def gradcam_heatmap(model, image_batch, layer_name: str | None = None) -> np.ndarray:
    """Heat maps [n, H, W] in [0, 1] for a batch of raw 0..255 images [n, H, W, 3].

    ``layer_name``: a top-level layer with a 4-D output (default: the last one;
    for InceptionV3 transfer that is the whole backbone).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(np.asarray(image_batch, np.float32))
    if images.shape.rank == 3:
        images = images[None]
    target = layer_name or models.last_conv_layer_name(model)
    with tf.GradientTape() as tape:
        feature_maps, score = _forward(model, images, target, tape)
    grads = tape.gradient(score, feature_maps)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(tf.cast(weights * feature_maps, tf.float32), axis=-1))
    cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    return cam.numpy().astype(np.float32)


def _forward(model, images, target: str, tape):
    """Run the model layer by layer (both CNNs here are chains of top-level layers,
    a nested backbone being one of them) and keep the ``target`` layer's output."""
    import keras
    import tensorflow as tf

    x, feature_maps = images, None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = layer(x, training=False)
        if layer.name == target:
            feature_maps = x
            tape.watch(feature_maps)
    if feature_maps is None:
        raise ValueError(f"{model.name} has no layer {target!r}")
    # Per-image scores are independent, so the gradient of their sum gives each image's own.
    return feature_maps, tf.reduce_sum(tf.cast(x, tf.float32))


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """uint8 RGB: the image with the heat map blended in (jet colour map)."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255).astype(np.float32)
    blended = (1 - alpha) * np.asarray(image, np.float32) + alpha * colours
    return np.clip(blended, 0, 255).astype(np.uint8)
