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
