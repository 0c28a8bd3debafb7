"""What the notebooks in ``notebooks/`` use, in three rooms:

* ``shim``: one notebook file runs on Databricks and locally: ``get_param`` (a widget, else ``CXR_<NAME>``),
  ``notebook_config``, ``spark_for_notebook``, ``display_or_save`` / ``show_table`` (shown, and saved under
  ``$CXR_NOTEBOOK_OUT``);
* ``runs``: run folders as tables and test scores (``metrics_table``, ``spark_test_scores``, ``cnn_test_scores``,
  ``score_files_local``);
* ``compare``: the two model paths side by side on the same images (``compare_models``, ``plot_roc_comparison``),
  computed with ``cxr_pipeline.metrics`` and drawn with ``cxr_pipeline.plots``.

Notebooks import from this package; the names below are its public surface.
"""
from .shim import (  # noqa: F401
    env_var_name,
    convert_like,
    on_databricks,
    get_param,
    notebook_config,
    default_data_uri,
    require,
    default_runs_uri,
    spark_for_notebook,
    spark_description,
    output_dir,
    display_or_save,
    show_table,
    with_settings,
    OUT_ENV,
    ENV_PREFIX,
)

from .runs import (  # noqa: F401
    image_key,
    describe_pipeline,
    metrics_table,
    counts_table,
    show_run_figures,
    spark_test_scores,
    cnn_test_scores,
    run_threshold,
    score_files_local,
    probability_gap,
)

from .compare import (  # noqa: F401
    join_scores,
    compare_models,
    agreement_table,
    threshold_table,
    plot_roc_comparison,
    plot_predictions,
)
