"""Where a backbone's pretrained weights are: the files ``make weights`` provisioned, and staging them to HDFS.

This is all the jobs need at run time. How the files are made offline (converted from pinned registry packages,
then verified against a manifest) is :mod:`cxr_pipeline.models.weights.provisioning`;
``python -m cxr_pipeline.models.weights`` is its command line (``provision``, ``verify``, ``path``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cxr_pipeline import paths

WEIGHT_FILES = {
    "InceptionV3": "inception_v3_notop.weights.h5",
    "Xception": "xception_notop.weights.h5",
}
# keras.applications models the featurizer knows but for which no registry ships weights.
NO_OFFLINE_WEIGHTS = ("ResNet50", "MobileNetV2", "DenseNet121")


class WeightsNotFound(FileNotFoundError):
    """No provisioned weights file for a model."""


def default_weights_path(model_name: str, weights_dir: Path | None = None) -> Path:
    """The provisioned no-top weights file for ``model_name`` (InceptionV3, Xception)."""
    weights_dir = Path(weights_dir or paths.WEIGHTS_DIR)
    if model_name in NO_OFFLINE_WEIGHTS:
        raise WeightsNotFound(
            f"no offline weights exist here for {model_name} (only {', '.join(WEIGHT_FILES)} can be "
            f"provisioned from the registries): pass a weights file path, or weights='imagenet' "
            f"on a machine with internet access (Keras downloads them)"
        )
    if model_name not in WEIGHT_FILES:
        known = ", ".join([*WEIGHT_FILES, *NO_OFFLINE_WEIGHTS])
        raise ValueError(f"unknown model {model_name!r}; known: {known}")
    path = weights_dir / WEIGHT_FILES[model_name]
    if not path.is_file():
        raise WeightsNotFound(f"{model_name} weights not found at {path}: run `make weights` first")
    return path


def stage_to_hdfs(model_name: str, uri: str, weights_dir: Path | None = None) -> str:
    """Upload the provisioned weights of ``model_name`` to ``uri`` (a file URI, or a folder ending in /).

    Executors (or a YARN job) can then read the weights from the cluster instead
    of a path that exists only on the machine that ran ``make weights``.
    """
    from cxr_pipeline.infra import storage

    local = default_weights_path(model_name, weights_dir)
    target = uri + local.name if uri.endswith("/") else uri
    storage.upload_file(str(local), target)
    return target


def local_copy(uri: str) -> str:
    """A local path holding the weights file ``uri`` (an hdfs:// URI or a local path), fetched once per host into
    a folder named after the URI; a local path comes back as it is. Its sha256 is checked where it is loaded."""
    from cxr_pipeline.infra import storage

    if not storage.is_remote(uri):
        return uri
    folder = os.path.join(tempfile.gettempdir(), "cxr-weights", hashlib.sha1(uri.encode()).hexdigest()[:16])
    target = os.path.join(folder, os.path.basename(uri.rstrip("/")))
    if not os.path.isfile(target):
        os.makedirs(folder, exist_ok=True)
        partial = f"{target}.part-{os.getpid()}"  # two processes fetching at once never see half a file
        storage.download_file(uri, partial)
        os.replace(partial, target)
    return target
