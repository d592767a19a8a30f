"""Run config: overrides parse by field type, and wrong types or keys are rejected."""

import json

import pytest

from cap_jax import config


def test_overrides_parse_by_type():
    loaded = config.load_config(None, ["epochs=3", "use_margin=false", "threshold=0.5",
                                       "name=2024", "train_subset=null", "model=random:tiny"])
    assert loaded.epochs == 3
    assert loaded.use_margin is False
    assert loaded.threshold == 0.5
    assert loaded.name == "2024"
    assert loaded.train_subset is None
    assert loaded.model == "random:tiny"
    assert config.load_config(None, ["use_margin=False"]).use_margin is False
    assert config.load_config(None, ["shared_adapter=True"]).shared_adapter is True


@pytest.mark.parametrize("override", ["use_margin=maybe", "epochs=true", "epochs=2.5",
                                      "batch_size=[32]"])
def test_wrong_override_type_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"config key '{key}' in the command-line overrides"):
        config.load_config(None, [override])


def test_wrong_file_type_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"epochs": "five"}))
    with pytest.raises(ValueError, match="'epochs' in .*bad.json must be int, got 'five'"):
        config.load_config(str(path))


def test_shipped_configs_have_valid_types():
    names = [p.stem for p in config.config_path_list()]
    assert "fashion_mnist_ul_quick" in names
    for name in names:
        config.load_config(name)
