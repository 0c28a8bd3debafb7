"""The Databricks source-format parser, the local runner and the widgets-or-env parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_pipeline import notebook_support as ns
from cxr_pipeline.notebook_support import runner as nr

REPO = Path(__file__).resolve().parents[1]

GOOD = """# Databricks notebook source
# MAGIC %md
# MAGIC # Title
# MAGIC Some *markdown*.

# COMMAND ----------

x = 2
y = x * 3

# COMMAND ----------

# MAGIC %python
# MAGIC z = y + 1

# COMMAND ----------

result = [x, y, z]
"""

FAILING = """# Databricks notebook source
a = 1

# COMMAND ----------

# MAGIC %md
# MAGIC text

# COMMAND ----------

b = a + 1
raise ValueError("boom in cell three")

# COMMAND ----------

never = True
"""

WITH_PIP = """# Databricks notebook source
# MAGIC %pip install something

# COMMAND ----------

done = True
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_parse_cells_kinds_and_lines():
    cells = nr.parse_notebook(GOOD)
    assert [c.kind for c in cells] == ["markdown", "code", "code", "code"]
    assert [c.number for c in cells] == [1, 2, 3, 4]
    assert cells[0].magic == "%md"
    assert "# Title" in cells[0].source and "# MAGIC" not in cells[0].source
    assert cells[1].source == "x = 2\ny = x * 3"
    assert cells[1].first_line == GOOD.splitlines().index("x = 2") + 1
    assert cells[2].source.strip() == "z = y + 1"


def test_parse_rejects_plain_python():
    with pytest.raises(nr.NotebookFormatError, match="Databricks notebook source"):
        nr.parse_notebook("x = 1\n")


def test_run_cells_shares_one_namespace():
    namespace: dict = {}
    result = nr.run_cells(nr.parse_notebook(GOOD), namespace=namespace, log=lambda *_: None)
    assert result.ok
    assert namespace["result"] == [2, 6, 7]
    assert [c.status for c in result.cells] == ["skipped", "ok", "ok", "ok"]


def test_failing_cell_stops_with_its_number_and_line():
    namespace: dict = {}
    lines: list[str] = []
    result = nr.run_cells(nr.parse_notebook(FAILING), "nb.py", namespace=namespace, log=lines.append)
    assert not result.ok
    failed = result.failed_cell
    assert failed.number == 3
    assert "boom in cell three" in failed.message
    # The traceback points at the notebook's own line of the raise.
    raise_line = FAILING.splitlines().index('raise ValueError("boom in cell three")') + 1
    assert f'File "nb.py", line {raise_line}' in failed.message
    assert "never" not in namespace and namespace["b"] == 2
    assert any("cell 3/4" in line and "FAILED" in line for line in lines)


def test_magic_cells_refused_unless_skipped():
    cells = nr.parse_notebook(WITH_PIP)
    assert cells[0].kind == "magic" and cells[0].magic == "%pip"
    with pytest.raises(nr.UnsupportedMagicError, match=r"cell 1 \(%pip\)"):
        nr.run_cells(cells, log=lambda *_: None)
    result = nr.run_cells(cells, skip_magics=True, log=lambda *_: None)
    assert result.ok and result.cells[0].status == "skipped"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.notebook_support.runner", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_cli_failure_exit_code_and_report(tmp_path):
    notebook = write(tmp_path, "bad_nb.py", FAILING)
    proc = run_cli(str(notebook), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "cell 3 failed" in proc.stderr
    assert "ValueError: boom in cell three" in proc.stdout
    report = json.loads((tmp_path / "out" / "bad_nb" / "cells.json").read_text())
    assert report["ok"] is False
    assert [c["status"] for c in report["cells"]] == ["ok", "skipped", "error"]


def test_cli_params_plots_and_magic_refusal(tmp_path):
    notebook = write(
        tmp_path,
        "plot_nb.py",
        """# Databricks notebook source
from cxr_pipeline.notebook_support import get_param, display_or_save
import matplotlib.pyplot as plt
n = get_param("n_points", 3, "How many points")

# COMMAND ----------

fig, ax = plt.subplots()
ax.plot(range(n))
path = display_or_save(fig, "line plot")
assert path.name == "line_plot.png", path
print("points", n)
""",
    )
    proc = run_cli(str(notebook), "--out", str(tmp_path / "out"), "--param", "n_points=5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "points 5" in proc.stdout
    png = tmp_path / "out" / "plot_nb" / "line_plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    pip_nb = write(tmp_path, "pip_nb.py", WITH_PIP)
    proc = run_cli(str(pip_nb))
    assert proc.returncode == 2
    assert "%pip" in proc.stderr and "--skip-magics" in proc.stderr


# ---- notebook_support parameters -------------------------------------------------------------


class FakeWidgets:
    """Stands in for Databricks' dbutils.widgets (no Databricks here); records what was created."""

    def __init__(self, values: dict[str, str]):
        self.values = values
        self.created: list[tuple[str, str, str]] = []

    def text(self, name, default, label):
        self.created.append((name, default, label))
        self.values.setdefault(name, default)

    def get(self, name):
        return self.values[name]


class FakeDbutils:
    def __init__(self, values):
        self.widgets = FakeWidgets(values)


def test_get_param_env_then_default(monkeypatch):
    monkeypatch.delenv("CXR_EPOCHS", raising=False)
    assert ns.get_param("epochs", 3) == 3
    monkeypatch.setenv("CXR_EPOCHS", "7")
    assert ns.get_param("epochs", 3) == 7
    monkeypatch.setenv("CXR_USE_CACHE", "no")
    assert ns.get_param("use_cache", True) is False
    monkeypatch.setenv("CXR_FEATURE_LAYER", "none")
    assert ns.get_param("feature_layer", None) is None
    monkeypatch.setenv("CXR_IMAGE_SIZE", "150")
    assert ns.get_param("image_size", None, cast=int) == 150
    monkeypatch.setenv("CXR_IMAGE_SIZE", "")
    assert ns.get_param("image_size", None, cast=int) is None
    monkeypatch.setenv("CXR_RATE", "abc")
    with pytest.raises(ValueError, match="CXR_RATE"):
        ns.get_param("rate", 0.5)


def test_get_param_uses_widgets_when_dbutils_in_caller_globals(monkeypatch):
    monkeypatch.setenv("CXR_EPOCHS", "7")  # ignored on Databricks: the widget wins
    dbutils = FakeDbutils({"epochs": "4"})
    code = compile("value = get_param('epochs', 3, 'Epochs')\nother = get_param('size', 64)", "<nb>", "exec")
    scope = {"dbutils": dbutils, "get_param": ns.get_param}
    exec(code, scope)  # noqa: S102
    assert scope["value"] == 4 and scope["other"] == 64
    assert ("epochs", "3", "Epochs") in dbutils.widgets.created
    assert ns.env_var_name("data-uri") == "CXR_DATA_URI"


def test_display_or_save_and_show_table(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    monkeypatch.setenv("CXR_NOTEBOOK_OUT", str(tmp_path))
    shown = []
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [1, 2])
    path = ns.display_or_save(fig, "bars", namespace={"display": shown.append})
    assert path == tmp_path / "bars.png" and path.stat().st_size > 1000
    assert shown == [fig]
    html = []
    png_path = ns.display_or_save(path.read_bytes(), "bars again", namespace={"displayHTML": html.append})
    assert png_path.read_bytes() == path.read_bytes()
    assert len(html) == 1 and html[0].startswith('<img src="data:image/png;base64,')
    csv = ns.show_table(pd.DataFrame({"k": [1, 2]}), "table one", namespace={})
    assert pd.read_csv(csv)["k"].tolist() == [1, 2]
    with pytest.raises(ValueError):
        ns.display_or_save(plt.figure(), "///")


# ---- notebook_support report helpers ---------------------------------------------------------


def test_with_settings_and_image_key():
    config = {"featurizer": {"feature_layer": None, "batch_size": 16}, "cnn": {"epochs": 10}}
    merged = ns.with_settings(config, {"featurizer.feature_layer": "mixed5", "cnn.epochs": 1, "cnn.model": None})
    assert merged["featurizer"] == {"feature_layer": "mixed5", "batch_size": 16}
    assert merged["cnn"] == {"epochs": 1} and config["cnn"]["epochs"] == 10
    assert ns.image_key("hdfs://nn:9000/d/chest_xray/test/NORMAL/a.jpeg") == "test/NORMAL/a.jpeg"
    assert ns.image_key("file:/tmp/x/test/NORMAL/a.jpeg") == ns.image_key("/other/test/NORMAL/a.jpeg")


def test_metrics_and_counts_tables_from_run_reports():
    at = {
        "threshold": 0.3,
        "n": 4,
        "accuracy": 0.75,
        "sensitivity": 1.0,
        "specificity": 0.5,
        "precision": 0.67,
        "npv": 1.0,
        "f1": 0.8,
        "tn": 1,
        "fp": 1,
        "fn": 0,
        "tp": 2,
    }
    report = {
        "test": {"areaUnderROC": 0.9, "at_chosen": at, "at_default_0.5": {**at, "threshold": 0.5}},
        "validation": {"roc_auc": 1.0, "at_chosen": at, "at_default_0.5": None},
        "counts": {"test": {"NORMAL": 2, "PNEUMONIA": 2}, "train": {"NORMAL": 5, "PNEUMONIA": 6}},
    }
    table = ns.metrics_table(report)
    assert list(table["subset"]) == ["test", "test", "validation"]
    assert list(table["threshold"]) == [0.3, 0.5, 0.3] and table["auc"].tolist() == [0.9, 0.9, 1.0]
    counts = ns.counts_table(report)
    assert list(counts["subset"]) == ["train", "test"] and counts["total"].tolist() == [11, 4]
    cnn = ns.counts_table({"label_names": ["NORMAL", "PNEUMONIA"], "class_counts": {"val": [1, 2], "train": [3, 4]}})
    assert cnn.to_dict("records")[0] == {"subset": "train", "NORMAL": 3, "PNEUMONIA": 4, "total": 7}


def test_join_compare_and_agreement_on_the_same_images():
    import pandas as pd

    spark_scores = pd.DataFrame(
        {"key": ["t/N/a", "t/N/b", "t/P/c", "t/P/d"], "label": [0, 0, 1, 1], "score": [0.1, 0.6, 0.9, 0.4]}
    )
    cnn_scores = pd.DataFrame({"key": ["t/N/a", "t/N/b", "t/P/c"], "label": [0, 0, 1], "score": [0.2, 0.3, 0.8]})
    joined = ns.join_scores({"spark": spark_scores, "cnn": cnn_scores})
    assert list(joined.columns) == ["key", "label", "spark", "cnn"] and len(joined) == 3  # only shared images
    table = ns.compare_models(joined, {"spark": 0.5, "cnn": 0.25}).set_index(["model", "threshold_rule"])
    assert table.loc[("spark", "0.5"), "fp"] == 1 and table.loc[("spark", "0.5"), "tp"] == 1
    assert table.loc[("cnn", "chosen on validation"), "fp"] == 1  # 0.3 >= 0.25
    assert table.loc[("cnn", "0.5"), "accuracy"] == 1.0
    agreement = ns.agreement_table(joined, {"spark": 0.5, "cnn": 0.5}).set_index("outcome")["images"]
    assert agreement.to_dict() == {"both right": 2, "only spark right": 0, "only cnn right": 1, "both wrong": 0}
    bad = cnn_scores.assign(label=[1, 0, 1])
    with pytest.raises(ValueError, match="labels disagree"):
        ns.join_scores({"spark": spark_scores, "cnn": bad})
    assert ns.plot_roc_comparison(joined, ["spark", "cnn"])[:4] == b"\x89PNG"


def test_threshold_table_and_probability_gap():
    import pandas as pd

    table = ns.threshold_table([0, 0, 1, 1], [0.2, 0.6, 0.4, 0.9], thresholds=(0.1, 0.5, 0.95))
    assert table["sensitivity"].tolist() == [1.0, 0.5, 0.0]
    assert table["specificity"].tolist() == [0.0, 0.5, 1.0]
    a = pd.DataFrame({"path": ["hdfs://nn:9000/x/a.jpeg", "hdfs://nn:9000/x/b.jpeg"], "probability": [0.5, None]})
    b = pd.DataFrame({"path": ["/x/a.jpeg", "/x/b.jpeg"], "probability": [0.5004, 0.1]})
    n, gap = ns.probability_gap(a, b)
    assert n == 1 and gap == pytest.approx(0.0004)


def test_describe_pipeline_lists_stages_and_set_params(spark):
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import StandardScaler

    pipeline = Pipeline(
        stages=[
            StandardScaler(inputCol="f", outputCol="s", withMean=True),
            LogisticRegression(featuresCol="s", regParam=0.1),
        ]
    )
    table = ns.describe_pipeline(pipeline)
    assert list(table["class"]) == ["StandardScaler", "LogisticRegression"]
    assert "inputCol=f" in table.loc[0, "columns"] and "withMean=True" in table.loc[0, "params"]
    assert "regParam=0.1" in table.loc[1, "params"] and "maxIter" not in table.loc[1, "params"]


def test_defaults_on_databricks_do_not_point_at_the_local_hdfs():
    config = ns.notebook_config("local")
    databricks = {"dbutils": FakeDbutils({})}
    assert ns.default_data_uri(config, namespace={}) == config["data"]["uri"]
    assert ns.default_data_uri(config, namespace=databricks) == ""  # loopback HDFS is meaningless there
    assert (
        ns.default_runs_uri(config, "/Volumes/main/cxr/files/chest_xray", namespace=databricks)
        == "/Volumes/main/cxr/files/runs"
    )
    assert ns.default_runs_uri(config, "x", namespace={}) == config["hdfs"]["namenode_uri"].rstrip("/") + "/runs"
    with pytest.raises(ValueError, match="CXR_DATA_URI"):
        ns.require("data_uri", "")
