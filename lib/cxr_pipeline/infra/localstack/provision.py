"""Provision the Apache Hadoop 2.7.3 HDFS server jars from the package registries.

No registry ships a current Hadoop server, but the pyspark 2.4.8 *source
distribution* on PyPI bundles the full Hadoop 2.7.3 jars (NameNode, DataNode,
FsShell). WebHDFS additionally needs Jersey 1, which Debian packages. So:

1. ``pip download --no-deps --no-build-isolation pyspark==2.4.8`` into the
   download cache (skipped when the sdist is already there) and extract its
   ``jars/*.jar``, leaving out Spark, Hive, Scala and Jersey 2 (which would clash
   with Jersey 1 inside the NameNode's web server).
2. ``apt-get download`` the four Jersey 1 / JSR-311 packages into the cache and
   take their jars out with ``dpkg -x``.
3. Create empty ``webapps/{hdfs,datanode,secondary,static}`` folders: the jars do
   not contain the web UI resources, but the HTTP server (REST, /jmx) needs the
   folders to exist on the classpath.
4. Write the classpath to ``<HADOOP_HOME>/classpath.txt`` and touch
   ``<HADOOP_HOME>/.provisioned`` (the Makefile's stamp).

``python -m cxr_pipeline.infra.localstack.provision [--force]``; a second run is a no-op.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ... import paths
from ...cli import Command, Job, add_config_options, run

PYSPARK_SDIST_VERSION = "2.4.8"
PYSPARK_SDIST_NAME = f"pyspark-{PYSPARK_SDIST_VERSION}.tar.gz"
JERSEY1_DEBS = (
    "libjersey1-core-java",
    "libjersey1-server-java",
    "libjersey1-servlet-java",
    "libjsr311-api-java",
)
# Jars of the sdist we do not want on the HDFS classpath: Spark/Hive/Scala (and
# Scala-built libraries, Spark's resource managers, SQL engines) are useless to
# HDFS, and Jersey 2 (with its JAX-RS 2 API and HK2) breaks Jersey 1.
EXCLUDED_JAR_PATTERNS = (
    "spark-*",
    "hive-*",
    "scala-*",
    "*_2.11-*",
    "kubernetes-*",
    "mesos-*",
    "calcite-*",
    "datanucleus-*",
    "derby-*",
    "arrow-*",
    "orc-*",
    "parquet-*",
    "jersey-*-2.*",
    "jersey-guava-*",
    "javax.ws.rs-api-2.*",
    "hk2-*",
    "aopalliance-repackaged-*",
)
WEBAPPS = ("hdfs", "datanode", "secondary", "static")
REQUIRED_JARS = ("hadoop-hdfs-2.7.3.jar", "hadoop-common-2.7.3.jar")


class ProvisionError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[provision] {message}", flush=True)


def stamp_path(hadoop_home: Path = paths.HADOOP_HOME) -> Path:
    return hadoop_home / ".provisioned"


def classpath_file(hadoop_home: Path = paths.HADOOP_HOME) -> Path:
    return hadoop_home / "classpath.txt"


def is_provisioned(hadoop_home: Path = paths.HADOOP_HOME) -> bool:
    return stamp_path(hadoop_home).exists() and classpath_file(hadoop_home).exists()


def read_classpath(hadoop_home: Path = paths.HADOOP_HOME) -> str:
    """The provisioned Hadoop classpath; a clear error when ``make hadoop`` was not run."""
    if not is_provisioned(hadoop_home):
        raise ProvisionError(
            f"Hadoop jars are not provisioned under {hadoop_home}: run `make hadoop` "
            "(or `python -m cxr_pipeline.infra.localstack.provision`)"
        )
    return classpath_file(hadoop_home).read_text().strip()


def is_wanted_jar(name: str) -> bool:
    return name.endswith(".jar") and not any(fnmatch.fnmatch(name, p) for p in EXCLUDED_JAR_PATTERNS)


def _run(cmd: list[str], cwd: Path | None = None, what: str = "") -> None:
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ProvisionError(f"{what or cmd[0]}: command {cmd[0]!r} not found ({exc})") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ProvisionError(f"{what or ' '.join(cmd)} failed (exit {result.returncode}):\n{tail}")


def download_pyspark_sdist(downloads: Path) -> Path:
    sdist = downloads / PYSPARK_SDIST_NAME
    if sdist.exists():
        log(f"cached: {sdist}")
        return sdist
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {PYSPARK_SDIST_NAME} (~220 MB) from PyPI into {downloads}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        "-d",
        str(downloads),
        f"pyspark=={PYSPARK_SDIST_VERSION}",
    ]
    try:
        _run(cmd, what="pip download pyspark==2.4.8")
    except ProvisionError as exc:
        raise ProvisionError(
            f"{exc}\nIs PyPI reachable (pip config / proxy)? The sdist is needed for the Hadoop jars."
        ) from exc
    if not sdist.exists():
        raise ProvisionError(f"pip download finished but {sdist} is missing")
    return sdist


def extract_hadoop_jars(sdist: Path, lib_dir: Path) -> list[Path]:
    log(f"extracting Hadoop jars from {sdist.name}")
    lib_dir.mkdir(parents=True, exist_ok=True)
    extracted = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if not member.isfile() or "/jars/" not in member.name or not is_wanted_jar(name):
                continue
            target = lib_dir / name
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            extracted.append(target)
    missing = [jar for jar in REQUIRED_JARS if not (lib_dir / jar).exists()]
    if missing:
        raise ProvisionError(f"{sdist} does not contain {missing}: is it the pyspark 2.4.8 sdist?")
    return extracted


def _apt_download(packages: tuple[str, ...], downloads: Path) -> None:
    _run(["apt-get", "download", *packages], cwd=downloads, what="apt-get download " + " ".join(packages))


def download_jersey1_debs(downloads: Path) -> list[Path]:
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [pkg for pkg in JERSEY1_DEBS if not list(downloads.glob(f"{pkg}_*.deb"))]
    if missing:
        log(f"apt-get download {' '.join(missing)}")
        try:
            _apt_download(tuple(missing), downloads)
        except ProvisionError:
            log("apt-get download failed; running apt-get update and retrying")
            try:
                _run(["apt-get", "update"], what="apt-get update")
                _apt_download(tuple(missing), downloads)
            except ProvisionError as exc:
                raise ProvisionError(
                    f"{exc}\nCould not fetch Jersey 1 from the Debian registry (is it reachable? "
                    "`apt-get update` needs root). WebHDFS needs these jars."
                ) from exc
    else:
        log("cached: Jersey 1 .debs")
    return [sorted(downloads.glob(f"{pkg}_*.deb"))[-1] for pkg in JERSEY1_DEBS]


def extract_deb_jars(debs: list[Path], lib_dir: Path) -> list[Path]:
    extracted = []
    with tempfile.TemporaryDirectory(prefix="cxr-deb-") as tmp:
        for deb in debs:
            _run(["dpkg", "-x", str(deb), tmp], what=f"dpkg -x {deb.name}")
        java_dir = Path(tmp) / "usr" / "share" / "java"
        for jar in sorted(java_dir.glob("*.jar")):
            if jar.is_symlink():  # versioned aliases of the same jar
                continue
            target = lib_dir / jar.name
            shutil.copyfile(jar, target)
            extracted.append(target)
    if not extracted:
        raise ProvisionError(f"no jars found in {[d.name for d in debs]}")
    return extracted


def make_webapps(hadoop_home: Path) -> Path:
    webapps_root = hadoop_home / "share"
    for name in WEBAPPS:
        (webapps_root / "webapps" / name).mkdir(parents=True, exist_ok=True)
    return webapps_root


def provision(hadoop_home: Path = paths.HADOOP_HOME, cache_dir: Path = paths.CACHE_DIR, force: bool = False) -> Path:
    """Provision the jars; returns the classpath file. No-op when already done."""
    if is_provisioned(hadoop_home) and not force:
        log(f"already provisioned: {hadoop_home} (use --force to redo)")
        return classpath_file(hadoop_home)
    started = time.monotonic()
    downloads = cache_dir / "downloads"
    lib_dir = hadoop_home / "lib"
    if lib_dir.exists():
        shutil.rmtree(lib_dir)
    stamp_path(hadoop_home).unlink(missing_ok=True)

    sdist = download_pyspark_sdist(downloads)
    hadoop_jars = extract_hadoop_jars(sdist, lib_dir)
    jersey_jars = extract_deb_jars(download_jersey1_debs(downloads), lib_dir)
    webapps_root = make_webapps(hadoop_home)

    # webapps_root first: Hadoop's HttpServer2 finds "webapps/<name>" as a classpath resource.
    entries = [str(webapps_root)] + sorted(str(p) for p in lib_dir.glob("*.jar"))
    classpath_file(hadoop_home).write_text(os.pathsep.join(entries) + "\n")
    size_mb = sum(p.stat().st_size for p in lib_dir.glob("*.jar")) / 1e6
    stamp_path(hadoop_home).touch()
    log(
        f"done in {time.monotonic() - started:.1f} s: {len(hadoop_jars)} Hadoop + {len(jersey_jars)} Jersey 1 jars "
        f"({size_mb:.0f} MB) in {lib_dir}; classpath in {classpath_file(hadoop_home)}"
    )
    return classpath_file(hadoop_home)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.infra.localstack.provision",
        description="Provision Apache Hadoop 2.7.3 HDFS jars (from the pyspark 2.4.8 sdist on PyPI "
        "and Debian's Jersey 1) into .local/hadoop. Cached and idempotent.",
    )
    parser.add_argument(
        "--hadoop-home", type=Path, default=paths.HADOOP_HOME, help="where to put the jars (default: %(default)s)"
    )
    parser.add_argument("--cache-dir", type=Path, default=paths.CACHE_DIR, help="download cache (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="re-extract even when already provisioned")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def _provision(job: Job) -> int:
    provision(job.args.hadoop_home, job.args.cache_dir, force=job.args.force)
    return 0


COMMAND = Command("provision", build_parser, _provision, errors=lambda: (ProvisionError,))


def main(argv: list[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
