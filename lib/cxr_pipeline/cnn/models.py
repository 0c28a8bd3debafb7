"""CNN architectures. Every model takes raw 0..255 RGB pixels (float) and does
its own scaling, so a saved ``model.keras`` needs no outside preprocessing.
"""

from __future__ import annotations

import os

import keras
from keras import layers

from .settings import MODEL_NAMES

# InceptionV3's block outputs, in order; cutting or unfreezing happens at these.
INCEPTION_BLOCKS = tuple(f"mixed{i}" for i in range(11))
INCEPTION_MIN_SIZE = 75
# Keras' default 0.99 leaves the moving variance near its initial 1.0 for a few hundred
# steps; activations here have far smaller variance, so inference-mode outputs collapse
# to a constant early on. 0.9 tracks the statistics within tens of steps.
BN_MOMENTUM = 0.9


def _separable_block(x, filters: int, dropout: float = 0.0):
    x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same")(x)
    x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    x = layers.MaxPooling2D(2)(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return x


def build_small_cnn(input_size: int) -> keras.Model:
    """The seeds' from-scratch CNN: five convolution blocks (the last four separable,
    with batch norm; dropout on the last two), then 512-128-64 dense with dropout."""
    if input_size < 32:
        raise ValueError(f"small_cnn needs input_size >= 32 (five 2x poolings), got {input_size}")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = layers.MaxPooling2D(2)(x)
    x = _separable_block(x, 32)
    x = _separable_block(x, 64)
    x = _separable_block(x, 128, dropout=0.2)
    x = _separable_block(x, 256, dropout=0.2)
    x = layers.Flatten()(x)
    for units, rate in ((512, 0.7), (128, 0.5), (64, 0.3)):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(rate)(x)
    # float32 output keeps the sigmoid stable under mixed precision.
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def inception_backbone(
    input_size: int,
    weights: str | os.PathLike | None,
    feature_layer: str | None,
) -> keras.Model:
    """InceptionV3 without top, with the provisioned weights, ending at ``feature_layer`` (None: the whole network;
    the provisioned weights are ImageNet only up to about mixed5: see weights.py)."""
    if input_size < INCEPTION_MIN_SIZE:
        raise ValueError(f"InceptionV3 needs input_size >= {INCEPTION_MIN_SIZE}, got {input_size}")
    full = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(input_size, input_size, 3))
    if weights != "none":
        if weights is None:
            from cxr_pipeline.models.weights import default_weights_path

            weights = default_weights_path("InceptionV3")
        full.load_weights(str(weights))
    if feature_layer is None or feature_layer == INCEPTION_BLOCKS[-1]:
        return keras.Model(full.input, full.output, name="inception_v3")
    if feature_layer not in INCEPTION_BLOCKS:
        raise ValueError(
            f"cnn.inception.feature_layer must be one of {', '.join(INCEPTION_BLOCKS)}, got {feature_layer!r}"
        )
    return keras.Model(full.input, full.get_layer(feature_layer).output, name="inception_v3")


def build_inception_transfer(
    input_size: int,
    weights: str | os.PathLike | None,
    feature_layer: str | None,
    dense_units: int,
    dropout: float,
) -> keras.Model:
    """Frozen InceptionV3 backbone + global average pooling + dense/batch-norm head + sigmoid.

    ``weights``: a ``.weights.h5`` path, None for the provisioned default
    (``cxr_pipeline.models.weights.default_weights_path``), or "none" for random init (tests).
    The backbone is a nested model always called in inference mode, so its batch
    norms keep their statistics when top blocks are unfrozen for fine-tuning.
    The other arguments are ``cnn.inception`` (:class:`.settings.InceptionSettings`).
    """
    backbone = inception_backbone(input_size, weights, feature_layer)
    backbone.trainable = False
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)  # InceptionV3 expects [-1, 1]
    x = backbone(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(dense_units, activation="relu")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name="inception_v3_transfer")


def build_model(name: str, input_size: int, **options) -> keras.Model:
    if name == "small_cnn":
        return build_small_cnn(input_size)
    if name == "inception_v3":
        return build_inception_transfer(input_size, **options)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def backbone_of(model: keras.Model) -> keras.Model | None:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    return None


def export_backbone(model: keras.Model, start_weights: str | os.PathLike | None, path: str | os.PathLike) -> None:
    """Write the trained backbone of ``model`` as a whole no-top InceptionV3 weights file, the shape that
    ``keras.applications.InceptionV3(include_top=False)`` and so the Spark featurizer load (``featurizer.weights``).

    Layers up to the cut carry the trained values; layers past it keep ``start_weights``, the file training
    started from (None = the provisioned default), which the featurizer never reads when it pools at the cut.
    """
    trained = backbone_of(model)
    if trained is None:
        raise ValueError(f"{model.name} has no pretrained backbone to export")
    whole = inception_backbone(int(trained.input_shape[1]), start_weights, feature_layer=None)
    # A cut model lists its layers in the whole network's order, so they pair up with its first ones;
    # the class and weight shapes are checked rather than assumed.
    for source, target in zip(trained.layers, whole.layers):
        shapes = [w.shape for w in source.weights], [w.shape for w in target.weights]
        if type(source) is not type(target) or shapes[0] != shapes[1]:
            raise ValueError(f"cannot export {trained.name}: layer {source.name} does not match {target.name}")
        if source.weights:
            target.set_weights(source.get_weights())
    whole.save_weights(str(path))


def unfreeze_top_blocks(model: keras.Model, n_blocks: int) -> list[str]:
    """Make the last ``n_blocks`` Inception blocks of the backbone trainable (batch
    norms stay frozen); returns the names of the layers made trainable."""
    backbone = backbone_of(model)
    if backbone is None:
        raise ValueError(f"{model.name} has no pretrained backbone to unfreeze")
    block_ends = [i for i, layer in enumerate(backbone.layers) if layer.name in INCEPTION_BLOCKS]
    if n_blocks <= 0:
        return []
    # Layers after the end of block (last - n_blocks) are the top n_blocks.
    start = block_ends[-n_blocks - 1] + 1 if n_blocks < len(block_ends) else 0
    backbone.trainable = True
    unfrozen = []
    for i, layer in enumerate(backbone.layers):
        trainable = i >= start and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable
        if trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def trainable_summary(model: keras.Model) -> dict[str, int]:
    count = lambda ws: int(sum(int(w.numpy().size) for w in ws))  # noqa: E731
    return {"trainable": count(model.trainable_weights), "frozen": count(model.non_trainable_weights)}


def last_conv_layer_name(model: keras.Model) -> str:
    """The top-level layer with the last 4-D output (a nested backbone counts as one)."""
    for layer in reversed(model.layers):
        if not isinstance(layer, layers.InputLayer) and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"{model.name} has no 4-D (convolutional) layer output")
