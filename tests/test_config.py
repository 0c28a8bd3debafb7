import pytest

from cxr_pipeline.config import ConfigError, get, load_config, parse_override, require_choice


def test_env_overrides_defaults_and_cli_overrides_env():
    local = load_config("local")
    assert local["spark"]["master"] == "local[2]"
    standalone = load_config("standalone")
    assert standalone["spark"]["master"].startswith("spark://")
    # untouched defaults survive the merge
    assert standalone["featurizer"]["model_name"] == "InceptionV3"
    cli = load_config("local", overrides=["featurizer.batch_size=4", "spark.master=local[1]", "new.flag=true"])
    assert get(cli, "featurizer.batch_size") == 4
    assert get(cli, "spark.master") == "local[1]"
    assert get(cli, "new.flag") is True


def test_bad_env_and_bad_override_say_what_is_wrong():
    with pytest.raises(ConfigError, match="unknown environment"):
        load_config("nope")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no-equals-sign")


def test_dumped_config_never_carries_secrets():
    import yaml

    from cxr_pipeline.config import dump_config

    config = load_config("local", overrides=["dicom.patient_key=site-secret-123", "tracking.api_token=tok-456"])
    text = dump_config(config)
    assert "site-secret-123" not in text and "tok-456" not in text
    dumped = yaml.safe_load(text)
    assert dumped["dicom"]["patient_key"] == "<redacted>" and dumped["tracking"]["api_token"] == "<redacted>"
    assert dumped["training"] == config["training"]  # the rest still says how the run was made


def test_require_choice_names_the_setting_and_its_choices():
    assert require_choice("cv", ("none", "cv"), "training.tuning") == "cv"
    with pytest.raises(ConfigError, match=r"training.tuning must be one of \('none', 'cv'\), got 'grid'"):
        require_choice("grid", ("none", "cv"), "training.tuning")


# ---------------------------------------------------------------- every default in conf/defaults.yaml

DEFAULTS_FILE = "defaults.yaml"
# Each section of conf/defaults.yaml that a settings class holds (config.section_settings builds it: an unknown
# key is refused, a missing one named). A nested section ("cnn.augment") is a field of its parent's class.
SETTINGS_CLASSES = {
    "hdfs": "cxr_pipeline.infra.storage.endpoints:HdfsSettings",
    "hdfs_load": "cxr_pipeline.infra.hdfs_load.shared:HdfsLoadSettings",
    "dicom": "cxr_pipeline.images.dicom:DicomSettings",
    "featurizer": "cxr_pipeline.spark.featurizer:FeaturizerSettings",
    "training": "cxr_pipeline.evaluation.training_settings:TrainingSettings",
    "cnn": "cxr_pipeline.cnn.settings:CnnSettings",
    "cnn.augment": "cxr_pipeline.cnn.settings:AugmentSettings",
    "cnn.reduce_lr": "cxr_pipeline.cnn.settings:ReduceLrSettings",
    "cnn.inception": "cxr_pipeline.cnn.settings:InceptionSettings",
    "cnn.fine_tune": "cxr_pipeline.cnn.settings:FineTuneSettings",
    "outputs": "cxr_pipeline.infra.run_folder:OutputSettings",
    "serving": "cxr_pipeline.serving.settings:ServingSettings",
    "tracking": "cxr_pipeline.tracking:TrackingSettings",
}
# The settings no class holds, and the files that read them (each must name the key, see _reads).
DOCUMENTED_READERS = {
    "data.uri": ("jobs/train_featurizer.py", "jobs/train_cnn.py", "jobs/pack_images.py", "scripts/hdfs_load.py"),
    "data.source": (
        "lib/cxr_pipeline/spark/reader.py",
        "lib/cxr_pipeline/spark/classifier/training.py",
        "lib/cxr_pipeline/cnn/train.py",
    ),
    "data.max_pixels": (
        "lib/cxr_pipeline/images/decode.py",
        "lib/cxr_pipeline/spark/featurizer.py",
        "lib/cxr_pipeline/cnn/train.py",
    ),
    "data.intensity": ("lib/cxr_pipeline/spark/featurizer.py", "lib/cxr_pipeline/cnn/train.py"),
    "spark.master": ("lib/cxr_pipeline/spark/session.py", "lib/cxr_pipeline/infra/yarn.py"),
    "spark.app_name": ("lib/cxr_pipeline/spark/session.py", "lib/cxr_pipeline/infra/yarn.py"),
    "spark.log_level": ("lib/cxr_pipeline/spark/session.py",),
    "spark.conf": ("lib/cxr_pipeline/spark/session.py", "lib/cxr_pipeline/infra/yarn.py"),
    "yarn.py_files": ("lib/cxr_pipeline/infra/yarn.py",),
    "yarn.queue": ("lib/cxr_pipeline/infra/yarn.py",),
    "yarn.spark_submit": ("lib/cxr_pipeline/infra/yarn.py",),
    "runs.uri": ("lib/cxr_pipeline/notebook_support/shim.py",),
}


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def _defaults() -> dict:
    from cxr_pipeline.config import read_yaml

    return read_yaml(_repo() / "conf" / DEFAULTS_FILE)


def _settings_class(section: str) -> type:
    import importlib

    module, name = SETTINGS_CLASSES[section].split(":")
    return getattr(importlib.import_module(module), name)


def _section_settings_calls() -> set[tuple[str, str]]:
    """(class name, section) of every ``section_settings(cls, config, "section")`` call under lib/."""
    import ast

    found = set()
    for path in (_repo() / "lib" / "cxr_pipeline").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for owner in [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]:
            for call in [node for node in ast.walk(owner) if isinstance(node, ast.Call)]:
                name = getattr(call.func, "attr", getattr(call.func, "id", None))
                if name == "section_settings" and len(call.args) >= 3 and isinstance(call.args[2], ast.Constant):
                    cls = call.args[0].id if isinstance(call.args[0], ast.Name) else None
                    found.add((owner.name if cls == "cls" else cls, call.args[2].value))
    return found


def _reads(path: str, dotted: str) -> bool:
    """Whether the file reads the setting: it names ``section.key``, or the key of a section it takes whole."""
    text = (_repo() / path).read_text()
    return dotted in text or f'"{dotted.rsplit(".", 1)[-1]}"' in text


def test_every_settings_class_is_listed_here():
    found = _section_settings_calls()
    listed = {(spec.split(":")[1], section) for section, spec in SETTINGS_CLASSES.items()}
    assert found == listed, f"section_settings calls {sorted(found - listed)} are not in SETTINGS_CLASSES"


def test_every_settings_class_is_built_from_defaults_yaml_alone():
    defaults = _defaults()
    for section in SETTINGS_CLASSES:
        if "." not in section:
            settings = _settings_class(section).from_config(defaults)
            assert type(settings).__name__ == SETTINGS_CLASSES[section].split(":")[1]


@pytest.mark.parametrize("section", sorted(SETTINGS_CLASSES))
def test_a_setting_missing_from_the_config_is_named_never_replaced(section):
    import copy

    defaults = _defaults()
    top = section.split(".")[0]
    for key in get(defaults, section):
        broken = copy.deepcopy(defaults)
        del get(broken, section)[key]
        with pytest.raises(ConfigError, match=key):
            _settings_class(top).from_config(broken)


def test_every_key_of_defaults_yaml_is_read():
    from dataclasses import fields

    unread = []
    for section, values in _defaults().items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if section in SETTINGS_CLASSES:
                known = {f.name for f in fields(_settings_class(section))}
                if key not in known:
                    unread.append(dotted)
                elif dotted in SETTINGS_CLASSES:
                    nested = {f.name for f in fields(_settings_class(dotted))}
                    unread += [f"{dotted}.{k}" for k in value if k not in nested]
            elif not DOCUMENTED_READERS.get(dotted):
                unread.append(dotted)
            else:
                unread += [f"{dotted} in {path}" for path in DOCUMENTED_READERS[dotted] if not _reads(path, dotted)]
    assert unread == [], "settings no class holds and no documented reader reads"


def test_a_missing_documented_setting_is_a_config_error_naming_it():
    from cxr_pipeline.config import require

    with pytest.raises(ConfigError, match="data.uri is missing"):
        require({"data": {}}, "data.uri")
    assert require({"runs": {"uri": None}}, "runs.uri") is None  # null is a value: "the documented default"
