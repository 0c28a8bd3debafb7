"""Where the project keeps its local state.

Everything a command provisions lives in one of two places:

* ``LOCAL_DIR`` (``<repo>/.local``, git-ignored): extracted Hadoop jars, the local
  HDFS's data/log/pid folders, converted model weights, standalone Spark logs.
* ``CACHE_DIR`` (``$CXR_CACHE_DIR`` or ``~/.cache/cxr_pipeline``): downloaded
  archives (sdists, wheels, npm tarballs, .debs), kept across fresh clones so a
  second set-up does not download again.

Both are overridable by environment variables so tests and CI can relocate them.
"""

import os
from pathlib import Path


def _find_repo_root() -> Path:
    env = os.environ.get("CXR_REPO_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "setup.py").exists() and (parent / "conf").is_dir():
            return parent
    # Installed as a wheel outside the repo: fall back to the working directory.
    return Path.cwd()


REPO_ROOT = _find_repo_root()


def _find_conf_dir() -> Path:
    """``$CXR_CONF_DIR``, else the repository's ``conf/``, else the copy bundled in the wheel."""
    env = os.environ.get("CXR_CONF_DIR")
    if env:
        return Path(env)
    in_repo = REPO_ROOT / "conf"
    bundled = Path(__file__).resolve().parent / "_conf"
    if not (in_repo / "defaults.yaml").is_file() and (bundled / "defaults.yaml").is_file():
        return bundled
    return in_repo


CONF_DIR = _find_conf_dir()
LOCAL_DIR = Path(os.environ.get("CXR_LOCAL_DIR", REPO_ROOT / ".local"))
CACHE_DIR = Path(os.environ.get("CXR_CACHE_DIR", Path.home() / ".cache" / "cxr_pipeline"))
DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", REPO_ROOT / "data"))

HADOOP_HOME = LOCAL_DIR / "hadoop"
HDFS_STATE_DIR = LOCAL_DIR / "hdfs"
SPARK_STATE_DIR = LOCAL_DIR / "spark"
WEIGHTS_DIR = LOCAL_DIR / "weights"
SAMPLE_TREE = DATA_DIR / "sample" / "chest_xray"
