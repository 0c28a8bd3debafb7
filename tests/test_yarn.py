"""YARN packaging: the wheel builds and the spark-submit arguments are what YARN needs.

YARN itself cannot run here; these tests check the command, not its execution.
"""

import os
import subprocess
import sys
import zipfile

import pytest

from cxr_pipeline import config as cfg
from cxr_pipeline.infra import yarn


def _flag(args, name):
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_spark_submit_args_from_yarn_conf():
    config = cfg.load_config("yarn")
    args = yarn.spark_submit_args(
        config,
        "jobs/train_featurizer.py",
        ["--data", "hdfs:///data/chest_xray", "--out", "hdfs:///runs/r1"],
        py_files=["dist/cxr_pipeline-0.1.0-py3-none-any.whl"],
    )
    assert args[:3] == ["spark-submit", "--master", "yarn"]
    assert _flag(args, "--deploy-mode") == ["cluster"]
    assert _flag(args, "--archives") == ["cxr_env.tar.gz#environment"]
    assert _flag(args, "--py-files") == ["dist/cxr_pipeline-0.1.0-py3-none-any.whl"]
    confs = dict(c.split("=", 1) for c in _flag(args, "--conf"))
    assert confs["spark.pyspark.python"] == "./environment/bin/python"
    assert confs["spark.yarn.appMasterEnv.PYSPARK_PYTHON"] == "./environment/bin/python"
    assert confs["spark.executor.memoryOverhead"] == "4g"
    assert "spark.submit.deployMode" not in confs and "spark.yarn.dist.archives" not in confs
    job_at = args.index("jobs/train_featurizer.py")
    assert args[job_at + 1 :] == ["--conf-env", "yarn", "--data", "hdfs:///data/chest_xray", "--out", "hdfs:///runs/r1"]


def test_overrides_reach_the_command_and_bad_config_is_refused():
    config = cfg.load_config(
        "yarn", overrides=["spark.conf.spark.executor.instances=10", "spark.conf.spark.submit.deployMode=client"]
    )
    args = yarn.spark_submit_args(config, "jobs/predict.py", [], py_files=[])
    assert "spark.executor.instances=10" in _flag(args, "--conf")
    assert _flag(args, "--deploy-mode") == ["client"]
    assert not any(c.startswith("spark.yarn.appMasterEnv") for c in _flag(args, "--conf"))
    assert "--py-files" not in args
    with pytest.raises(yarn.YarnConfigError):
        yarn.spark_submit_args(cfg.load_config("local"), "jobs/predict.py")
    with pytest.raises(yarn.YarnConfigError):
        yarn.spark_submit_args(
            cfg.load_config("yarn", overrides=["spark.conf.spark.yarn.dist.archives=null"]), "jobs/predict.py"
        )


@pytest.mark.slow
def test_wheel_builds_with_the_package_and_jobs_import_it(tmp_path):
    wheel = yarn.build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "spark/classifier/training.py",
        "spark/classifier/prediction.py",
        "spark/classifier/model_export.py",
        "models/weights/__init__.py",
        "models/weights/provisioning.py",
        "notebook_support/shim.py",
        "infra/yarn.py",
        "spark/session.py",
    ):
        assert f"cxr_pipeline/{module}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    # conf/ travels inside the wheel, so an installed package has its defaults without the repository
    for name in ("defaults.yaml", "local.yaml", "yarn.yaml", "hadoop/core-site.xml"):
        assert f"cxr_pipeline/_conf/{name}" in names
    installed, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["PYTHONPATH"] = str(installed)
    probe = (
        "from cxr_pipeline import config, paths; c = config.load_config('yarn'); "
        "print(paths.CONF_DIR); print(c['spark']['master'])"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert shown == [str(installed / "cxr_pipeline" / "_conf"), "yarn"]
    out = yarn.main(["jobs/train_featurizer.py", "--", "--out", "hdfs:///runs/x"])
    assert out == 0
