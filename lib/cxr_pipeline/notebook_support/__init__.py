"""What the notebooks in ``notebooks/`` use, in three rooms:

* ``shim``: one notebook file runs on Databricks and locally: ``get_param`` (a widget, else ``CXR_<NAME>``),
  ``notebook_config``, ``spark_for_notebook``, ``display_or_save`` / ``show_table`` (shown, and saved under
  ``$CXR_NOTEBOOK_OUT``);
* ``runs``: run folders as tables and test scores (``metrics_table``, ``spark_test_scores``, ``cnn_test_scores``,
  ``score_files_local``);
* ``compare``: the two model paths side by side on the same images (``compare_models``, ``plot_roc_comparison``),
  computed with ``cxr_pipeline.evaluation.metrics`` and drawn with ``cxr_pipeline.evaluation.plots``.

Notebooks import from this package; the names below are its public surface.
"""

from .compare import (  # noqa: F401
    agreement_table,
    compare_models,
    join_scores,
    plot_predictions,
    plot_roc_comparison,
    threshold_table,
)
from .runs import (  # noqa: F401
    cnn_test_scores,
    counts_table,
    describe_pipeline,
    image_key,
    metrics_table,
    probability_gap,
    run_threshold,
    score_files_local,
    show_run_figures,
    spark_test_scores,
)
from .shim import (  # noqa: F401
    ENV_PREFIX,
    OUT_ENV,
    convert_like,
    default_data_uri,
    default_runs_uri,
    display_or_save,
    env_var_name,
    get_param,
    notebook_config,
    on_databricks,
    output_dir,
    require,
    show_table,
    spark_description,
    spark_for_notebook,
    with_settings,
)
