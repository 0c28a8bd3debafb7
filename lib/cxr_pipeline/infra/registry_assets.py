"""Pinned archives fetched from the package registries (npm, PyPI), cached.

The project has no internet beyond the PyPI, Debian and npm registries, so the
real images and pretrained weights come out of two pinned packages:

* npm ``nsfwjs@4.3.0``: a Keras-2.2.4 InceptionV3 for TensorFlow.js.
* PyPI ``pneumonia-model-package==0.3.0``: 16 real Kermany chest X-rays and a
  Keras 3 model wrapping an ImageNet Xception backbone. It is only downloaded
  (``pip download --no-deps``) and read as a zip, never installed: installing it
  pulls in tensorflow-datasets, tox and conflicting pins.

Archives go to ``paths.CACHE_DIR/downloads`` and are checked against a pinned
sha256, so a second set-up (or a fresh clone) reuses them without a download.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cxr_pipeline import paths


@dataclass(frozen=True)
class Archive:
    registry: str  # "npm" | "pypi"
    name: str
    version: str
    file_name: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}" if self.registry == "npm" else f"{self.name}=={self.version}"


NSFWJS = Archive(
    registry="npm",
    name="nsfwjs",
    version="4.3.0",
    file_name="nsfwjs-4.3.0.tgz",
    sha256="4496790efc9bdc6f3e85a826a8e482c1fa1e9db4b3d18c095e98cc0c73cfb12f",
)
PNEUMONIA_MODEL_PACKAGE = Archive(
    registry="pypi",
    name="pneumonia-model-package",
    version="0.3.0",
    file_name="pneumonia_model_package-0.3.0-py3-none-any.whl",
    sha256="4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536",
)

# Inside the pneumonia-model-package wheel.
WHEEL_VAL_IMAGES_DIR = "pneumonia_model_package/datasets/pneumonia-data/val/"
WHEEL_XCEPTION_MODEL = "pneumonia_model_package/trained_models/pneumonia_xception_model_val-acc_0.861.keras"


class AssetError(RuntimeError):
    """A pinned archive could not be fetched or does not match its checksum."""


def downloads_dir() -> Path:
    return paths.CACHE_DIR / "downloads"


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_command(archive: Archive, dest: Path) -> list[str]:
    if archive.registry == "npm":
        return ["npm", "pack", "--silent", archive.spec]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), archive.spec]


def fetch(archive: Archive) -> Path:
    """The cached archive, downloaded from its registry the first time."""
    target = downloads_dir() / archive.file_name
    if target.exists() and sha256_of(target) == archive.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download into a scratch folder next to the cache, then rename: an
    # interrupted download never leaves a half file under the final name.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as scratch:
        command = _download_command(archive, Path(scratch))
        print(f"downloading {archive.spec} from {archive.registry} ...", file=sys.stderr)
        try:
            subprocess.run(command, cwd=scratch, check=True, stdout=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise AssetError(f"{command[0]} not found: it is needed to fetch {archive.spec}") from exc
        except subprocess.CalledProcessError as exc:
            raise AssetError(
                f"could not download {archive.spec} from the {archive.registry} registry "
                f"(exit {exc.returncode}): is the registry reachable?"
            ) from exc
        downloaded = Path(scratch) / archive.file_name
        if not downloaded.exists():
            raise AssetError(
                f"{archive.spec}: expected {archive.file_name} after the download, got "
                f"{sorted(p.name for p in Path(scratch).iterdir())}"
            )
        actual = sha256_of(downloaded)
        if actual != archive.sha256:
            raise AssetError(f"{archive.spec}: sha256 {actual} does not match the pinned {archive.sha256}")
        shutil.move(str(downloaded), target)
    return target


def open_wheel(archive: Archive = PNEUMONIA_MODEL_PACKAGE) -> zipfile.ZipFile:
    return zipfile.ZipFile(fetch(archive))


def wheel_val_images() -> dict[str, bytes]:
    """The 16 Kermany ``val`` JPEGs inside pneumonia-model-package: file name -> bytes."""
    with open_wheel() as wheel:
        return {
            Path(name).name: wheel.read(name)
            for name in sorted(wheel.namelist())
            if name.startswith(WHEEL_VAL_IMAGES_DIR) and name.lower().endswith((".jpeg", ".jpg"))
        }
