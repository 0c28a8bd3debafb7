"""What lets one notebook file run both on Databricks and locally.

* :func:`get_param`: a widget on Databricks (``dbutils`` in the notebook's
  globals); locally the environment variable ``CXR_<NAME>``, else the default.
* :func:`spark_for_notebook`: the ``spark`` Databricks provides, else a local
  session built from ``conf/`` (``local[2]`` by default).
* :func:`display_or_save` / :func:`show_table`: every plot and table is written
  under ``$CXR_NOTEBOOK_OUT`` (so a CI run can be looked at afterwards) and shown
  with the notebook's ``display`` where there is one.

The caller's globals are found by looking one frame up, so a notebook just calls
``get_param("data_uri", default)``; pass ``namespace=globals()`` to be explicit.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from . import config as config_mod

OUT_ENV = "CXR_NOTEBOOK_OUT"
ENV_PREFIX = "CXR_"
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off", ""}


def _caller_globals(namespace: Mapping[str, Any] | None, depth: int = 2) -> Mapping[str, Any]:
    if namespace is not None:
        return namespace
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back
        return frame.f_globals if frame is not None else {}
    finally:
        del frame


def env_var_name(name: str) -> str:
    """``"data_uri"`` -> ``"CXR_DATA_URI"`` (anything not alphanumeric becomes ``_``)."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def convert_like(text: str, default: Any) -> Any:
    """Parse a widget/env string into the type of ``default`` (bool, int, float, str; None stays str)."""
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected a yes/no value, got {text!r}")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if default is None and text.strip().lower() in {"", "none", "null"}:
        return None
    return text


def on_databricks(namespace: Mapping[str, Any] | None = None) -> bool:
    return "dbutils" in _caller_globals(namespace)


def get_param(name: str, default: Any, label: str | None = None, namespace: Mapping[str, Any] | None = None,
              cast=None) -> Any:
    """A notebook parameter, typed like ``default`` (or by ``cast``, e.g. ``int`` when the default is None).

    On Databricks a text widget ``name`` is created (showing ``default``) and
    read; elsewhere ``CXR_<NAME>`` from the environment wins over ``default``.
    ``None`` as default means "unset": an empty widget or ``none`` gives None.
    """
    scope = _caller_globals(namespace)
    dbutils = scope.get("dbutils")
    shown_default = "" if default is None else str(default)
    if dbutils is not None:
        dbutils.widgets.text(name, shown_default, label or name)
        raw = dbutils.widgets.get(name)
    else:
        raw = os.environ.get(env_var_name(name))
        if raw is None:
            return default
    try:
        value = convert_like(raw, default)
        return cast(value) if cast is not None and value is not None else value
    except ValueError as err:
        source = "widget" if dbutils is not None else env_var_name(name)
        raise ValueError(f"parameter {name!r} ({source}={raw!r}): {err}") from None


def _find_conf_dir() -> Path | None:
    """``conf/`` with ``defaults.yaml``: the package's repo (or ``$CXR_CONF_DIR``), else above the working directory
    (a Databricks Git folder runs notebooks with the working directory ``<repo>/notebooks``)."""
    from .paths import CONF_DIR

    candidates = [Path(CONF_DIR)] + [folder / "conf" for folder in (Path.cwd(), *Path.cwd().parents)]
    return next((c for c in candidates if (c / "defaults.yaml").is_file()), None)


def notebook_config(env: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The project config (``conf/``) for a notebook; ``CXR_ENV`` picks the environment (default local)."""
    conf_dir = _find_conf_dir()
    if conf_dir is None:
        raise config_mod.ConfigError(
            "the project's conf/ folder was not found: open the notebooks from the repository (a Databricks "
            "Git folder), or set the environment variable CXR_CONF_DIR to a copy of conf/"
        )
    return config_mod.load_config(env, overrides=overrides, conf_dir=conf_dir)


_LOOPBACK = re.compile(r"^[a-z][a-z0-9+.-]*://(127\.0\.0\.1|localhost)([:/]|$)", re.IGNORECASE)


def default_data_uri(config: Mapping[str, Any], namespace: Mapping[str, Any] | None = None) -> str:
    """``data.uri`` of the config; empty on Databricks when it names this project's loopback HDFS."""
    uri = str(config_mod.get(config, "data.uri", "") or "")
    if on_databricks(_caller_globals(namespace)) and _LOOPBACK.match(uri):
        return ""
    return uri


def require(name: str, value: Any) -> Any:
    """``value``, or a clear error naming the widget / environment variable to set."""
    if value in (None, ""):
        raise ValueError(f"parameter {name!r} is empty: set the {name} widget (Databricks) or {env_var_name(name)}")
    return value


def default_runs_uri(config: Mapping[str, Any], data_uri: str | None = None,
                     namespace: Mapping[str, Any] | None = None) -> str:
    """Where notebook runs go unless a parameter says otherwise.

    ``runs.uri`` from the config if set; on Databricks ``runs/`` next to the data folder
    (e.g. ``/Volumes/main/cxr/files/runs``); else ``<hdfs.namenode_uri>/runs``.
    """
    configured = config_mod.get(config, "runs.uri")
    if configured:
        return str(configured).rstrip("/")
    if data_uri and on_databricks(_caller_globals(namespace)):
        return data_uri.rstrip("/").rsplit("/", 1)[0] + "/runs"
    namenode = str(config_mod.get(config, "hdfs.namenode_uri", "")).rstrip("/")
    return f"{namenode}/runs" if namenode else str(Path(tempfile.gettempdir()) / "cxr_runs")


def spark_for_notebook(config: Mapping[str, Any] | None = None, namespace: Mapping[str, Any] | None = None):
    """The notebook's SparkSession: Databricks' ``spark`` if the notebook has one, else a local session.

    The local session comes from the ``spark`` section of the config (``local[2]``,
    Arrow on); ``CXR_SPARK_MASTER`` overrides the master. An already running
    session in this process is reused.
    """
    existing = _caller_globals(namespace).get("spark")
    if existing is not None:
        return existing
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    from .spark.session import spark_session

    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    config = dict(config or notebook_config())
    spark_conf = dict(config.get("spark", {}))
    # Progress bars garble a notebook's log.
    spark_conf["conf"] = {**dict(spark_conf.get("conf") or {}), "spark.ui.showConsoleProgress": "false"}
    config["spark"] = spark_conf
    session = spark_session(config, app_name="cxr-notebook", master=os.environ.get("CXR_SPARK_MASTER"))
    session.sparkContext.setLogLevel("ERROR")
    return session


def spark_description(spark) -> str:
    """``Spark 4.3.0, master local[2]``; the master is not visible through Spark Connect (serverless, shared clusters)."""
    try:
        master = spark.sparkContext.master
    except Exception:  # noqa: BLE001 - Spark Connect sessions have no SparkContext
        master = "(Spark Connect)"
    return f"Spark {spark.version}, master {master}"


def output_dir() -> Path:
    """Where plots and tables are written: ``$CXR_NOTEBOOK_OUT``, else a temp folder."""
    out = Path(os.environ.get(OUT_ENV) or Path(tempfile.gettempdir()) / "cxr_notebook_out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not cleaned:
        raise ValueError(f"unusable output name {name!r}")
    return cleaned


def _display_function(scope: Mapping[str, Any]):
    if "display" in scope and callable(scope["display"]):
        return scope["display"]          # Databricks' display()
    try:
        from IPython import get_ipython

        if get_ipython() is not None:
            from IPython.display import display

            return display
    except ImportError:
        pass
    return None


def _show_png(data: bytes, scope: Mapping[str, Any]) -> bool:
    if callable(scope.get("displayHTML")):          # Databricks
        import base64

        encoded = base64.b64encode(data).decode("ascii")
        scope["displayHTML"](f'<img src="data:image/png;base64,{encoded}"/>')
        return True
    show = _display_function(scope)
    if show is None:
        return False
    from IPython.display import Image

    show(Image(data=data))
    return True


def display_or_save(fig, name: str, namespace: Mapping[str, Any] | None = None, dpi: int = 100) -> Path:
    """Write a plot to ``<output_dir>/<name>.png`` and show it where the notebook can.

    ``fig`` is a matplotlib figure (closed afterwards) or PNG bytes, as the
    ``cxr_pipeline.plots.plot_*`` functions return.
    """
    path = output_dir() / f"{_safe_name(name)}.png"
    scope = _caller_globals(namespace)
    if isinstance(fig, (bytes, bytearray)):
        path.write_bytes(bytes(fig))
        shown = _show_png(bytes(fig), scope)
    else:
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        show = _display_function(scope)
        shown = show is not None
        if shown:
            show(fig)
        plt.close(fig)
    if not shown:
        print(f"[plot] {path}")
    return path


def show_table(table, name: str, namespace: Mapping[str, Any] | None = None, max_rows: int = 50) -> Path:
    """Write a pandas (or Spark) table to ``<output_dir>/<name>.csv`` and show it."""
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        table = table.toPandas() if hasattr(table, "toPandas") else pd.DataFrame(table)
    path = output_dir() / f"{_safe_name(name)}.csv"
    table.to_csv(path, index=False)
    show = _display_function(_caller_globals(namespace))
    if show is not None:
        show(table)
    elif table.empty:
        print(f"[{name}] (no rows)")
    else:
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(table.head(max_rows).to_string(index=False))
        if len(table) > max_rows:
            print(f"... {len(table) - max_rows} more rows in {path}")
    return path


# ---- settings from notebook parameters --------------------------------------------------------

def with_settings(config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with dotted keys (``"featurizer.feature_layer"``) set; a None value keeps the config's own."""
    merged = dict(config)
    for dotted, value in settings.items():
        if value is None:
            continue
        node: Any = value
        for key in reversed(dotted.split(".")):
            node = {key: node}
        merged = config_mod.deep_merge(merged, node)
    return merged


def image_key(path: str) -> str:
    """``split/CLASS/file`` of an image path or URI: the same image whatever scheme wrote its path."""
    from .dataset_layout import parse_image_path

    parsed = parse_image_path(path)
    return f"{parsed.split}/{parsed.label_name}/{parsed.file_name}"


# ---- run folders: pipeline, metrics, figures --------------------------------------------------

def describe_pipeline(pipeline) -> "pd.DataFrame":
    """One row per stage of a (fitted or not) Spark ML Pipeline: class, input/output columns, parameters set."""
    import pandas as pd

    if isinstance(pipeline, (list, tuple)):
        stages = list(pipeline)
    else:
        stages = pipeline.getStages() if hasattr(pipeline, "getStages") else pipeline.stages
    rows = []
    for index, stage in enumerate(stages):
        params = {p.name: stage.getOrDefault(p) for p in stage.params if stage.isSet(p) or stage.hasDefault(p)}
        columns = {k: params.pop(k) for k in list(params) if k.endswith("Col") or k.endswith("Cols")}
        rows.append({
            "stage": index,
            "class": type(stage).__name__,
            "columns": ", ".join(f"{k}={v}" for k, v in sorted(columns.items())),
            "params": ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if stage.isSet(stage.getParam(k))),
        })
    return pd.DataFrame(rows)


_REPORT_COLUMNS = ("threshold", "n", "accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "tn", "fp", "fn", "tp")


def metrics_table(report: Mapping[str, Any]) -> "pd.DataFrame":
    """The headline numbers of a Spark run's metrics.json: test (and validation) at the chosen threshold and 0.5."""
    import pandas as pd

    rows = []
    blocks = (("test", report.get("test") or {}, "areaUnderROC"), ("validation", report.get("validation") or {}, "roc_auc"))
    for subset, block, auc_key in blocks:
        for key, name in (("at_chosen", "chosen on validation"), ("at_default_0.5", "0.5")):
            values = block.get(key)
            if not values or "accuracy" not in values:
                continue
            row = {"subset": subset, "threshold_rule": name, "auc": block.get(auc_key)}
            row.update({k: values.get(k) for k in _REPORT_COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows)


def counts_table(report: Mapping[str, Any]) -> "pd.DataFrame":
    """Images per subset (train / val / test) and class from a run's metrics (``counts`` or ``class_counts``)."""
    import pandas as pd

    counts = report.get("counts")
    if counts is None:   # CNN runs: class_counts = {subset: [n per label]}
        names = report.get("label_names") or ["NORMAL", "PNEUMONIA"]
        counts = {subset: dict(zip(names, values)) for subset, values in (report.get("class_counts") or {}).items()}
    order = [s for s in ("train", "val", "test") if s in counts] + sorted(set(counts) - {"train", "val", "test"})
    table = pd.DataFrame([{"subset": s, **counts[s]} for s in order])
    if len(table):
        table["total"] = table.drop(columns="subset").sum(axis=1)
    return table


def show_run_figures(run_uri: str, file_names, prefix: str = "", namespace: Mapping[str, Any] | None = None) -> list[Path]:
    """Show the PNGs a training run wrote (``roc.png``, ...) and copy them to the notebook output; missing ones are named."""
    from . import storage

    scope = _caller_globals(namespace)
    shown = []
    for name in file_names:
        uri = run_uri.rstrip("/") + "/" + name
        if not storage.exists(uri):
            print(f"[plot] {uri} not written by this run (e.g. a one-class test set has no ROC)")
            continue
        shown.append(display_or_save(storage.read_bytes(uri), prefix + name.rsplit(".", 1)[0], namespace=scope))
    return shown


# ---- test scores of the two kinds of model, and comparing them -------------------------------

def spark_test_scores(spark, run_uri: str, data_uri: str | None = None) -> "pd.DataFrame":
    """P(PNEUMONIA) of a Spark run's PipelineModel on the test images: ``[key, path, label, score]``.

    Uses the run's features cache when it is still there (no re-featurizing),
    else reads the test images from ``data_uri`` (default: the run's data).
    """
    from pyspark.ml import PipelineModel
    from pyspark.sql import functions as F

    from . import storage
    from .spark_classifier import training

    run = training.RunLayout(run_uri.rstrip("/"))
    report = training.load_metrics(run.root)
    model = PipelineModel.load(run.model)
    featurizer, classifier = model.stages[0], PipelineModel(stages=model.stages[1:])
    features_col = featurizer.getOrDefault("outputCol")
    cache = (report.get("featurizer") or {}).get("cache")
    snapshot = cache.get("snapshot") if isinstance(cache, dict) else None
    if snapshot and storage.exists(snapshot.rstrip("/") + "/_SUCCESS") and storage.exists(run.images):
        import io

        import pandas as pd

        used = pd.read_csv(io.BytesIO(storage.read_bytes(run.images)))
        test = spark.createDataFrame(used[used["subset"] == "test"][["path", "label"]])
        features = spark.read.parquet(snapshot).join(test, "path")
    else:
        from .spark.reader import read_images_with_rejections

        images = read_images_with_rejections(spark, data_uri or report["data"]).images.where(F.col("split") == "test")
        features = featurizer.transform(images)
    scored = training.with_scores(classifier.transform(features.where(F.col(features_col).isNotNull())))
    table = scored.select("path", "label", F.col(training.SCORE_COL).alias("score")).toPandas()
    table.insert(0, "key", table["path"].map(image_key))
    return table.sort_values("key").reset_index(drop=True)


def cnn_test_scores(run_uri: str) -> "pd.DataFrame":
    """The CNN run's own test predictions (``predictions.csv``): ``[key, path, label, score]``."""
    import io

    import pandas as pd

    from . import storage

    table = pd.read_csv(io.BytesIO(storage.read_bytes(run_uri.rstrip("/") + "/predictions.csv")))
    table = table[table["used_as"] == "test"].rename(columns={"probability": "score"})
    table.insert(0, "key", table["path"].map(image_key))
    return table[["key", "path", "label", "score"]].sort_values("key").reset_index(drop=True)


def run_threshold(run_uri: str) -> float:
    """The validation-chosen threshold a run saved (classifier.json for Spark runs, cnn.json for CNN runs)."""
    import json

    from . import storage

    root = run_uri.rstrip("/")
    for name in ("classifier.json", "cnn.json"):
        if storage.exists(f"{root}/{name}"):
            return float(json.loads(storage.read_bytes(f"{root}/{name}"))["threshold"])
    raise FileNotFoundError(f"{root} has neither classifier.json nor cnn.json: not a training run folder")


def join_scores(scores: Mapping[str, "pd.DataFrame"]) -> "pd.DataFrame":
    """Per-model score tables joined on the image (only images every model scored): ``[key, label, <model>...]``."""
    joined = None
    for name, table in scores.items():
        part = table[["key", "label", "score"]].rename(columns={"score": name})
        if joined is None:
            joined = part
        else:
            joined = joined.merge(part, on="key", suffixes=("", "_other"))
            if (joined["label"] != joined["label_other"]).any():
                raise ValueError(f"{name}: labels disagree with the other models' for the same images")
            joined = joined.drop(columns="label_other")
    if joined is None:
        raise ValueError("no models to compare")
    return joined.reset_index(drop=True)


def compare_models(joined: "pd.DataFrame", thresholds: Mapping[str, float]) -> "pd.DataFrame":
    """Metrics of each model on the same images, at its own chosen threshold and at 0.5."""
    import pandas as pd

    from . import metrics as M

    labels = joined["label"].to_numpy()
    rows = []
    for name, threshold in thresholds.items():
        scores = joined[name].to_numpy()
        for rule, t in (("chosen on validation", threshold), ("0.5", M.DEFAULT_THRESHOLD)):
            report = M.binary_report(labels, scores, t).to_dict()
            rows.append({"model": name, "threshold_rule": rule, "auc": M.roc_auc(labels, scores),
                         **{k: report[k] for k in _REPORT_COLUMNS}})
    return pd.DataFrame(rows)


def agreement_table(joined: "pd.DataFrame", thresholds: Mapping[str, float]) -> "pd.DataFrame":
    """How often the models' decisions (each at its own threshold) are right: both, only one, neither."""
    import pandas as pd

    from . import metrics as M

    names = list(thresholds)
    correct = {n: M.predict_at(joined[n], thresholds[n]) == joined["label"].to_numpy() for n in names}
    rows = []
    if len(names) == 2:
        a, b = names
        for label, mask in (("both right", correct[a] & correct[b]), (f"only {a} right", correct[a] & ~correct[b]),
                            (f"only {b} right", ~correct[a] & correct[b]), ("both wrong", ~correct[a] & ~correct[b])):
            rows.append({"outcome": label, "images": int(mask.sum())})
    else:
        rows = [{"outcome": f"{n} right", "images": int(c.sum())} for n, c in correct.items()]
    return pd.DataFrame(rows)


def threshold_table(labels, scores, thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> "pd.DataFrame":
    """Sensitivity / specificity trade-off at a few thresholds (the curve is in the run's threshold.png)."""
    import pandas as pd

    from . import metrics as M

    rows = []
    for t in thresholds:
        r = M.binary_report(labels, scores, float(t))
        rows.append({"threshold": float(t), "sensitivity": r.sensitivity, "specificity": r.specificity,
                     "accuracy": r.accuracy, "fp": r.fp, "fn": r.fn})
    return pd.DataFrame(rows)


def plot_roc_comparison(joined: "pd.DataFrame", names, title: str = "ROC on the same test images") -> bytes:
    """ROC curves of several models over the same images (PNG bytes)."""
    import io

    import matplotlib.pyplot as plt

    from . import metrics as M

    labels = joined["label"].to_numpy()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name in names:
        if M.has_both_classes(labels):
            fpr, tpr, _ = M.roc_curve(labels, joined[name].to_numpy())
            ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {M.fmt(M.roc_auc(labels, joined[name].to_numpy()))})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ---- scoring files without Spark (a CNN run, or checking a Spark run's export) ---------------

def score_files_local(classifier, uri: str, limit: int | None = None, threshold: float | None = None) -> "pd.DataFrame":
    """Score the files under ``uri`` with a Spark-free classifier (``LocalClassifier``/``LocalCnnClassifier``).

    Returns ``[path, probability, label_name, threshold, error, content]``, sorted by path.
    Files that are not images come back with ``error`` set.
    """
    import pandas as pd

    from . import storage

    infos = sorted(storage.list_files(uri), key=lambda f: f.uri)[: limit or None]
    contents = [storage.read_bytes(info.uri) for info in infos]
    results = classifier.predict_bytes(contents, threshold=threshold) if contents else []
    table = pd.DataFrame([{"path": info.uri, **{k: r.get(k) for k in ("probability", "label_name", "threshold", "error")}}
                          for info, r in zip(infos, results)],
                         columns=["path", "probability", "label_name", "threshold", "error"])
    table["content"] = contents
    return table


def _path_only(uri: str) -> str:
    # hdfs://nn:9000/a, file:/a, file:///a and /a all name /a.
    text = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", "", str(uri))
    return re.sub(r"^file:", "", text)


def probability_gap(first: "pd.DataFrame", second: "pd.DataFrame") -> tuple[int, float]:
    """(images scored in both, largest |probability difference|) of two ``[path, probability]`` tables."""
    a = first[["path", "probability"]].dropna().assign(path=lambda d: d["path"].map(_path_only))
    b = second[["path", "probability"]].dropna().assign(path=lambda d: d["path"].map(_path_only))
    both = a.merge(b, on="path", suffixes=("_a", "_b"))
    if both.empty:
        return 0, float("nan")
    return len(both), float((both["probability_a"] - both["probability_b"]).abs().max())


def plot_predictions(scored: "pd.DataFrame", columns: int = 4, title: str = "Predictions") -> bytes:
    """Thumbnails of scored images titled with the predicted class and P(PNEUMONIA) (PNG bytes)."""
    import io

    import matplotlib.pyplot as plt

    from .exploration import thumbnail

    n = max(1, len(scored))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), scored.itertuples()):
        image = thumbnail(item.content, 192) if item.content is not None else None
        if image is not None:
            ax.imshow(image)
        name = str(item.path).rsplit("/", 1)[-1][:34]
        verdict = f"error: {item.error}" if item.error else f"{item.label_name} p={item.probability:.2f}"
        ax.set_title(f"{name}\n{verdict}", fontsize=7, color="red" if item.error else "black")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
