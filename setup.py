"""Packaging for the chest X-ray pneumonia pipeline.

The importable package lives under ``lib/``; job scripts in ``jobs/`` are thin
wrappers around it. Build a wheel for ``spark-submit --py-files`` with
``python setup.py bdist_wheel`` (or ``make wheel``).
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
BUNDLED_CONF = "cxr_pipeline/_conf"  # conf/ inside the wheel, used when no repository conf/ is found


class BuildPyWithConf(build_py):
    """Copies the repository's conf/ into the built package, so an installed wheel has its defaults."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / BUNDLED_CONF
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(HERE / "conf", target)


def read_requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


setup(
    name="cxr-pipeline",
    version="0.1.0",
    description="Chest X-ray pneumonia classification on Apache Spark, HDFS and TensorFlow",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    include_package_data=True,
    package_data={"cxr_pipeline": ["resources/*", "serving/templates/*", "serving/static/*"]},
    install_requires=read_requirements("requirements.txt"),
    cmdclass={"build_py": BuildPyWithConf},
    entry_points={
        "console_scripts": [
            "cxr-predict-image=cxr_pipeline.serving.predict_image:main",
        ]
    },
)
