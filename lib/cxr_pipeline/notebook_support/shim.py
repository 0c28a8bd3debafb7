"""The Databricks/local shim: what lets one notebook file run both on Databricks and locally.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config as config_mod

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


def get_param(
    name: str, default: Any, label: str | None = None, namespace: Mapping[str, Any] | None = None, cast=None
) -> Any:
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
    from ..paths import CONF_DIR

    candidates = [Path(CONF_DIR)] + [folder / "conf" for folder in (Path.cwd(), *Path.cwd().parents)]
    return next((c for c in candidates if (c / "defaults.yaml").is_file()), None)


# The notebook runner's --conf and --set (python -m cxr_pipeline.notebook_support.runner), for every notebook it runs.
CONF_FILES_VAR, CONF_SET_VAR = "CXR_CONF_FILES", "CXR_CONF_SET"


def notebook_config(env: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The project config (``conf/``) for a notebook; ``CXR_ENV`` picks the environment (default local). The
    runner's ``--conf`` files (``$CXR_CONF_FILES``, ``os.pathsep``-separated) and ``--set`` overrides
    (``$CXR_CONF_SET``, one per line) come before ``overrides``."""
    conf_dir = _find_conf_dir()
    if conf_dir is None:
        raise config_mod.ConfigError(
            "the project's conf/ folder was not found: open the notebooks from the repository (a Databricks "
            "Git folder), or set the environment variable CXR_CONF_DIR to a copy of conf/"
        )
    files = [f for f in os.environ.get(CONF_FILES_VAR, "").split(os.pathsep) if f]
    given = [line for line in os.environ.get(CONF_SET_VAR, "").splitlines() if line.strip()]
    return config_mod.load_config(env, files, [*given, *overrides], conf_dir=conf_dir)


_LOOPBACK = re.compile(r"^[a-z][a-z0-9+.-]*://(127\.0\.0\.1|localhost)([:/]|$)", re.IGNORECASE)


def default_data_uri(config: Mapping[str, Any], namespace: Mapping[str, Any] | None = None) -> str:
    """``data.uri`` of the config; empty on Databricks when it names this project's loopback HDFS."""
    uri = str(config_mod.require(config, "data.uri") or "")
    if on_databricks(_caller_globals(namespace)) and _LOOPBACK.match(uri):
        return ""
    return uri


def require(name: str, value: Any) -> Any:
    """``value``, or a clear error naming the widget / environment variable to set."""
    if value in (None, ""):
        raise ValueError(f"parameter {name!r} is empty: set the {name} widget (Databricks) or {env_var_name(name)}")
    return value


def default_runs_uri(
    config: Mapping[str, Any], data_uri: str | None = None, namespace: Mapping[str, Any] | None = None
) -> str:
    """Where notebook runs go unless a parameter says otherwise.

    ``runs.uri`` from the config if set; on Databricks ``runs/`` next to the data folder
    (e.g. ``/Volumes/main/cxr/files/runs``); else ``<hdfs.namenode_uri>/runs``.
    """
    configured = config_mod.require(config, "runs.uri")
    if configured:
        return str(configured).rstrip("/")
    if data_uri and on_databricks(_caller_globals(namespace)):
        return data_uri.rstrip("/").rsplit("/", 1)[0] + "/runs"
    namenode = str(config_mod.require(config, "hdfs.namenode_uri") or "").rstrip("/")
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
    from ..spark.session import spark_session

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
    """``Spark 4.3.0, master local[2]``; the master is hidden by Spark Connect (serverless, shared clusters)."""
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
        return scope["display"]  # Databricks' display()
    try:
        from IPython import get_ipython

        if get_ipython() is not None:
            from IPython.display import display

            return display
    except ImportError:
        pass
    return None


def _show_png(data: bytes, scope: Mapping[str, Any]) -> bool:
    if callable(scope.get("displayHTML")):  # Databricks
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
    ``cxr_pipeline.evaluation.plots.plot_*`` functions return.
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
