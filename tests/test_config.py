import pytest

from cxr_pipeline.config import ConfigError, get, load_config, parse_override


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
