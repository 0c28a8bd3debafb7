"""Every documented value of every option, run end to end (issue 30: ``--set data.source=image`` crashed).

An option's values are documented in its ``conf/defaults.yaml`` comment (``a | b (...) | c = ...``) and in
the jobs' ``--help`` choices. ``SPARK_CASES`` and ``CNN_CASES`` are training runs on the 16-image sample tree
in the real local HDFS (the Spark job on local Spark); a documented value is covered by a case whose resolved
config holds it (a default value by any case that leaves it alone), or by a test named in ``ELSEWHERE``.
``test_every_documented_value_is_run_end_to_end`` fails for a value nothing runs, so a new option value comes
with its run.

Kept cheap: the Spark cases that only change the classifier reuse the shared sample run's feature cache;
those that change the features use random weights and the smallest input each backbone takes, since what
they test (a source, a backbone, an intensity mode) does not depend on the weights.
"""

from __future__ import annotations

import ast
import csv
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_training import FAST_FEATURES
from tolerances import assert_same_probabilities

from cxr_pipeline import config as cfg

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = REPO / "conf" / "defaults.yaml"

# Which job reads an option: a documented value must be run by each of them.
JOBS_OF = {
    "data.source": ("spark", "cnn"),
    "data.intensity": ("spark", "cnn"),
    "training.validation": ("spark", "cnn"),
    "training.threshold_rule": ("spark", "cnn"),
    "training.tuning": ("spark",),
    "featurizer.model_name": ("spark",),
    "cnn.model": ("cnn",),
    "cnn.balance": ("cnn",),
    "cnn.cache": ("cnn",),
    "cnn.augment_on": ("cnn",),
    "cnn.mixed_precision": ("cnn",),
    "cnn.xla": ("cnn",),
    "cnn.verbose": ("cnn",),
    "hdfs_load.via": ("hdfs-load",),
    "hdfs_load.verify": ("hdfs-load",),
    "featurizer.runtime": ("spark",),
    "featurizer.precision": ("spark",),
    "cnn.runtime": ("cnn",),
    "cnn.precision": ("cnn",),
    "--conf-env": ("spark",),
}
# --help choices -> the option they set (None: a choice that is not a config key)
HELP_FLAGS = {
    "jobs/train_featurizer.py": {
        "--tuning": "training.tuning",
        "--validation": "training.validation",
        "--threshold-rule": "training.threshold_rule",
        "--conf-env": "--conf-env",
    },
    "jobs/train_cnn.py": {
        "--model": "cnn.model",
        "--balance": "cnn.balance",
        "--cache": "cnn.cache",
        "--verbose": "cnn.verbose",
        "--conf-env": "--conf-env",
    },
    "jobs/predict.py": {"--conf-env": "--conf-env"},
    "jobs/pack_images.py": {"--conf-env": "--conf-env"},
    "scripts/hdfs_load.py": {"--via": "hdfs_load.via", "--verify": "hdfs_load.verify", "--conf-env": "--conf-env"},
}

SPARK_BASE = [*FAST_FEATURES, "tracking.enabled=false"]
RANDOM_FEATURES = ["featurizer.weights=random", "featurizer.feature_layer=null"]
SPARK_CASES = {  # case -> --set overrides on top of SPARK_BASE
    "tvs+sensitivity": [
        "training.tuning=tvs",
        "training.threshold_rule=sensitivity",
        "training.grid.reg_param=[0.01, 0.1]",
        "training.grid.elastic_net_param=[0.0]",
    ],
    "folder+cost": ["training.validation=folder", "training.threshold_rule=cost"],
    "youden+keras": ["training.threshold_rule=youden", "featurizer.runtime=keras"],
    "image+ResNet50": [
        "data.source=image",
        "featurizer.model_name=ResNet50",
        *RANDOM_FEATURES,
        "featurizer.image_size=32",
    ],
    "parquet+MobileNetV2": [
        "data.source=parquet",
        "featurizer.model_name=MobileNetV2",
        *RANDOM_FEATURES,
        "featurizer.image_size=32",
    ],
    "intensity-none+DenseNet121": [
        "data.intensity=none",
        "featurizer.model_name=DenseNet121",
        *RANDOM_FEATURES,
        "featurizer.image_size=32",
    ],
    "Xception+openvino": [
        "featurizer.model_name=Xception",
        *RANDOM_FEATURES,
        "featurizer.image_size=71",
        "featurizer.runtime=openvino",
    ],
}
CNN_BASE = ["cnn.epochs=1", "cnn.batch_size=4", "cnn.image_size=32", "tracking.enabled=false"]
CNN_CASES = {
    "oversample+no-cache+pipeline+mixed-precision": [
        "cnn.balance=oversample",
        "cnn.cache=none",
        "cnn.augment_on=pipeline",
        "cnn.mixed_precision=true",
        "cnn.verbose=0",
        "data.intensity=none",
        "training.threshold_rule=sensitivity",
    ],
    "no-balance+memory+folder+image": [
        "cnn.balance=none",
        "cnn.cache=memory",
        "cnn.mixed_precision=false",
        "cnn.xla=false",
        "cnn.verbose=2",
        "data.source=image",
        "training.validation=folder",
        "training.threshold_rule=cost",
    ],
    "parquet+youden+onnxruntime": ["data.source=parquet", "training.threshold_rule=youden", "cnn.runtime=onnxruntime"],
    "xla+openvino": [
        "cnn.xla=true",
        "cnn.verbose=0",
        "cnn.runtime=openvino",
    ],  # XLA compiles for over a minute on 2 CPU cores
}
HDFS_LOAD_CASES = {
    "defaults": [],
    "size": ["hdfs_load.verify=size"],
}  # scripts/hdfs_load.py as `make hdfs-load` runs it
# (job, option, value) -> (test that runs it, the text in that test which sets it)
ELSEWHERE = {
    ("spark", "training.tuning", "cv"): (
        "test_training.py::test_retraining_reuses_features_with_tuning_and_no_weights",
        "training.tuning=cv",
    ),
    ("spark", "--conf-env", "local"): ("test_training.py::train_on_sample", '"local"'),
    ("spark", "--conf-env", "standalone"): (
        "test_training.py::test_job_on_standalone_cluster_via_spark_submit_reuses_a_local_runs_features",
        '"standalone"',
    ),
    ("cnn", "cnn.model", "inception_v3"): (
        "test_cnn.py::test_inception_transfer_one_epoch_with_fine_tuning",
        "cnn.model=inception_v3",
    ),
    ("cnn", "cnn.augment_on", "model"): (
        "test_cnn.py::test_augmentation_inside_the_model_saves_the_bare_model",
        "cnn.augment_on=model",
    ),
    ("hdfs-load", "hdfs_load.via", "cli"): (
        "test_hdfs_load.py::test_cli_transport_and_changed_files_are_reuploaded",
        'via="cli"',
    ),
    ("hdfs-load", "hdfs_load.via", "webhdfs"): (
        "test_hdfs_load.py::test_load_sample_tree_then_second_load_uploads_nothing",
        'via="webhdfs"',
    ),
    ("hdfs-load", "hdfs_load.verify", "checksum"): (
        "test_hdfs_load.py::test_verify_checksum_compares_content",
        '"--verify", "checksum"',
    ),
}
NOT_RUNNABLE_HERE = {  # (job, option, value) -> why no test here runs it
    ("spark", "--conf-env", "yarn"): "needs a YARN cluster (tests/test_yarn.py checks the submission it builds)",
    ("spark", "--conf-env", "gpu"): "needs a standalone cluster with GPU executors",
    ("spark", "featurizer.precision", "bf16"): "needs a CPU with AMX or avx512_bf16 (test_backbone_runtimes.py)",
    ("cnn", "cnn.precision", "bf16"): "needs a CPU with AMX or avx512_bf16 (test_backbone_runtimes.py)",
}


# ------------------------------------------------------------------ what is documented


def _comment_values(comment: str) -> set[str] | None:
    """The values an option comment enumerates, ``a | b (why) | c = what`` -> {a, b, c}; None when the
    comment is not such a list (free text, paths or URIs between the bars)."""
    if "|" not in comment:
        return None
    text = re.sub(r"\([^()]*\)", " ", comment)  # parenthesised notes
    values = set()
    for n, segment in enumerate(text.split("|")):
        segment = segment.split(": ")[-1] if n == 0 else segment  # "how X is chosen: a ..."
        match = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:(?:[=,;]|:\s).*)?", segment, flags=re.S)
        if not match:
            return None
        values.add(match.group(1))
    return values


def documented_values() -> dict[str, set[str]]:
    """``option -> values`` from the comments of conf/defaults.yaml (a comment may go on over the next lines,
    its ``#`` in the same column)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    key, hash_column = None, None
    for line in DEFAULTS.read_text().splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#"):
            if key and line.index("#") == hash_column:
                comments[key] += " " + stripped[1:].strip()
            else:
                key = None
            continue
        match = re.match(r"(\s*)([A-Za-z_][\w.-]*):(.*)", line)
        if not match:
            key = None
            continue
        indent = len(match.group(1))
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
        key = ".".join(k for _, k in stack)
        rest = match.group(3)
        hash_column = line.index("#") if " #" in rest else None
        comments[key] = rest.split(" #", 1)[1].strip() if hash_column is not None else ""
    return {k: v for k, v in ((k, _comment_values(c)) for k, c in comments.items()) if v}


@functools.lru_cache(maxsize=1)
def help_choices() -> dict[tuple[str, str], frozenset[str]]:
    """``(tool, flag) -> choices`` from each tool's ``--help`` (five interpreters: read once)."""
    found = {}
    for tool in HELP_FLAGS:
        out = subprocess.run(
            [sys.executable, str(REPO / tool), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        assert out.returncode == 0, out.stderr[-2000:]
        for flag, choices in re.findall(r"(--[\w-]+) \{([^}]*)\}", out.stdout):
            found[(tool, flag)] = frozenset(choices.split(","))
    return found


def resolved(base: list[str], case: list[str]) -> dict:
    return cfg.load_config("local", overrides=[*base, *case])


def as_written(value) -> str:
    """A config value as conf/defaults.yaml and --help write it (true, null, 2)."""
    return yaml.safe_dump(value).strip().removesuffix("...").strip()


def covering_cases(job: str, option: str, value: str) -> list[str]:
    if option.startswith("--"):  # a command-line choice, not a config key
        return []
    base, cases = {
        "spark": (SPARK_BASE, SPARK_CASES),
        "cnn": (CNN_BASE, CNN_CASES),
        "hdfs-load": ([], HDFS_LOAD_CASES),
    }[job]
    return [name for name, case in cases.items() if as_written(cfg.get(resolved(base, case), option)) == value]


def _test_source(where: str) -> str | None:
    """The source of ``file.py::function`` in tests/, None when there is no such function."""
    file, function = where.split("::")
    path = REPO / "tests" / file
    if not path.is_file():
        return None
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_source_segment(text, node)
    return None


def test_the_comment_parser_reads_one_line_and_continued_lists():
    values = documented_values()
    assert values["data.source"] == {"binaryFile", "image", "parquet"}
    assert values["training.threshold_rule"] == {"sensitivity", "youden", "cost", "fixed"}  # over two lines
    assert values["cnn.augment_on"] == {"auto", "model", "pipeline"}
    assert values["hdfs_load.via"] == {"auto", "cli", "webhdfs"}
    assert values["data.intensity"] == {"none", "equalize"}  # "equalize (...): the same for every path"
    assert "tracking.uri" not in values and "cnn.inception.weights" not in values  # URIs and paths, not lists
    assert _comment_values("a | b (one | two) | c = the third") == {"a", "b", "c"}
    assert _comment_values("null = a default | a .weights.h5 path") is None


def test_every_documented_value_is_run_end_to_end():
    values = {option: set(v) for option, v in documented_values().items()}
    problems = []
    for (tool, flag), choices in help_choices().items():
        option = HELP_FLAGS[tool].get(flag, "?")
        if option == "?":
            problems.append(f"{tool} {flag} has choices {sorted(choices)}: add it to HELP_FLAGS")
        elif option in values and option != "--conf-env" and values[option] != choices:
            problems.append(f"{tool} {flag} offers {sorted(choices)}, conf/defaults.yaml {sorted(values[option])}")
        else:
            values.setdefault(option, set()).update(choices)
    for option, choices in sorted(values.items()):
        if option not in JOBS_OF:
            problems.append(f"{option} documents {sorted(choices)}: add it to JOBS_OF (which job reads it)")
            continue
        for job in JOBS_OF[option]:
            for value in sorted(choices):
                entry = (job, option, value)
                if entry in NOT_RUNNABLE_HERE or covering_cases(job, option, value):
                    continue
                if entry in ELSEWHERE:
                    where, sets_it = ELSEWHERE[entry]
                    source = _test_source(where)
                    if source is None or sets_it not in source:
                        problems.append(f"{job} {option}={value}: {where} is gone or no longer has {sets_it!r}")
                    continue
                problems.append(f"{job} {option}={value}: no end-to-end run (add a case to this file)")
    for entry in [*ELSEWHERE, *NOT_RUNNABLE_HERE]:
        job, option, value = entry
        if value not in values.get(option, set()):
            problems.append(f"{entry} is no longer a documented value")
    assert problems == []


def test_a_value_nothing_runs_is_found(monkeypatch):
    """The guard can fail: a value documented only in --help, or a case that no longer sets its value."""
    monkeypatch.setitem(
        SPARK_CASES, "youden+keras", ["training.threshold_rule=sensitivity", "featurizer.runtime=keras"]
    )
    assert covering_cases("spark", "training.threshold_rule", "youden") == []
    with pytest.raises(AssertionError, match="training.threshold_rule=youden: no end-to-end run"):
        test_every_documented_value_is_run_end_to_end()


def test_an_undocumented_source_is_refused_before_any_work(spark, tmp_path):
    from cxr_pipeline.spark.classifier import training as T

    config = cfg.load_config("local", overrides=["data.source=tiff"])
    with pytest.raises(cfg.ConfigError, match=r"data.source must be one of \('binaryFile', 'image', 'parquet'\)"):
        T.train(spark, config, str(tmp_path / "no-data"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_backbone_without_offline_weights_is_a_clear_error_before_spark_starts(tmp_path):
    """featurizer.model_name=ResNet50 with the default weights (none can be provisioned offline) was a traceback
    after Spark had started; the job says what to do and exits 2."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train_featurizer.py"),
            *("--out", str(tmp_path / "run"), "--set", "featurizer.model_name=ResNet50"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no offline weights exist here for ResNet50" in out.stderr and "weights='imagenet'" in out.stderr
    assert "Traceback" not in out.stderr and "SparkContext" not in out.stderr


# ------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def sample_data(sample_in_hdfs):
    """(base, data): the session's sample tree in HDFS, with the training tests' feature cache."""
    return sample_in_hdfs


@pytest.fixture(scope="module")
def packed_sample(spark, sample_data):
    """The sample tree packed into a Parquet image table in HDFS (jobs/pack_images.py's writer)."""
    from cxr_pipeline.images.dicom import DicomSettings
    from cxr_pipeline.infra import storage
    from cxr_pipeline.spark.packing import pack_image_tree

    base, data = sample_data
    table = f"{base}/packed.parquet"
    if not storage.exists(f"{table}/_SUCCESS"):
        pack_image_tree(spark, data, table, dicom=DicomSettings.default())
    return table


def _source_uri(request, config: dict, tree: str) -> str:
    return request.getfixturevalue("packed_sample") if cfg.get(config, "data.source") == "parquet" else tree


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.parametrize("case", list(SPARK_CASES))
def test_spark_job_runs_each_option_value(case, spark, sample_data, request):
    from cxr_pipeline.infra import storage
    from cxr_pipeline.spark.classifier import training as T
    from cxr_pipeline.spark.reader import read_image_tree

    base, tree = sample_data
    config = resolved([*SPARK_BASE, f"training.features_cache={base}/_cache"], SPARK_CASES[case])
    data = _source_uri(request, config, tree)
    result = T.train(spark, config, data, f"{base}/options-{case.replace('+', '-')}")
    m = json.loads(storage.read_bytes(result.run.metrics))
    assert m["test"]["n"] == 4 and sum(sum(c.values()) for c in m["counts"].values()) == 16
    assert m["tuning"]["mode"] == cfg.get(config, "training.tuning")
    assert m["split"]["mode"] == cfg.get(config, "training.validation")
    assert m["threshold"]["rule"] == cfg.get(config, "training.threshold_rule")
    assert m["featurizer"]["model_name"] == cfg.get(config, "featurizer.model_name")
    assert m["featurizer"]["intensity"] == cfg.get(config, "data.intensity")
    if cfg.get(config, "training.validation") == "folder":
        assert m["counts"]["val"] == {"NORMAL": 2, "PNEUMONIA": 2}
    # the saved model scores raw image files whatever source it was trained from (prediction, serving)
    scored = T.with_scores(result.model.transform(read_image_tree(spark, f"{tree}/test"))).collect()
    assert len(scored) == 4 and all(0.0 <= r[T.SCORE_COL] <= 1.0 for r in scored)


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.parametrize("case", list(CNN_CASES))
def test_cnn_job_runs_each_option_value(case, sample_data, tmp_path, request):
    keras = pytest.importorskip("keras")
    from cxr_pipeline.cnn.train import train_and_evaluate

    _, tree = sample_data
    config = resolved(CNN_BASE, CNN_CASES[case])
    try:
        metrics = train_and_evaluate(config, _source_uri(request, config, tree), str(tmp_path / "run"))
    finally:
        keras.mixed_precision.set_global_policy("float32")  # cnn.mixed_precision=true sets it process-wide
    assert metrics["test"]["n"] == 4 and len(metrics["history"]["loss"]) == 1
    assert metrics["threshold_choice"]["rule"] == cfg.get(config, "training.threshold_rule")
    devices = metrics["devices"]
    assert devices["mixed_precision"] == (cfg.get(config, "cnn.mixed_precision") is True)
    assert devices["xla"] == (cfg.get(config, "cnn.xla") is True)
    train, val = (sum(metrics["class_counts"][s]) for s in ("train", "val"))
    assert train + val == 12 and (val == 4 if cfg.get(config, "training.validation") == "folder" else val > 0)
    saved = json.loads((tmp_path / "run" / "cnn.json").read_text())
    assert saved["intensity"] == cfg.get(config, "data.intensity")
    assert saved["runtime"] == cfg.get(config, "cnn.runtime")
    # the saved model scores as training did, through the configured runtime
    from cxr_pipeline.cnn.predict import LocalCnnClassifier
    from cxr_pipeline.infra import storage

    rows = [r for r in csv.DictReader((tmp_path / "run" / "predictions.csv").open()) if r["used_as"] == "test"]
    classifier = LocalCnnClassifier.load(str(tmp_path / "run"))
    got = classifier.predict_bytes([storage.read_bytes(r["path"]) for r in rows])
    assert_same_probabilities([g["probability"] for g in got], [float(r["probability"]) for r in rows])


@pytest.mark.hdfs
@pytest.mark.parametrize("case", list(HDFS_LOAD_CASES))
def test_hdfs_load_runs_each_option_value(case, sample_tree, hdfs_tmp):
    from cxr_pipeline.infra import storage

    target = f"{hdfs_tmp}/chest_xray"
    sets = [arg for setting in HDFS_LOAD_CASES[case] for arg in ("--set", setting)]
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "hdfs_load.py"), str(sample_tree), target, "--no-progress", *sets],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for path in sample_tree.rglob("*.jpeg"):
        assert storage.read_bytes(f"{target}/{path.relative_to(sample_tree)}") == path.read_bytes()
