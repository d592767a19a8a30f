"""Bad dataset input through `cap-jax run`: exit code 2 and a logged message saying what to fix.

The loaders' messages are tested in detail in test_data_sources.py. These tests check that they
reach the user of the command, before any model is loaded or anything is computed.
"""

import logging

import numpy as np
import PIL.Image

from cap_jax import cli


def write_folders(root, names, images_per_folder=2):
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(images_per_folder):
            PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")


def run_command(tmp_path, caplog, *overrides):
    """Run `cap-jax run` on the quick config with `overrides`; return (exit code, error log)."""
    argv = ["run", "--config", "fashion_mnist_ul_quick", "--workdir", str(tmp_path / "run"),
            "--no-progress", "--set", "model=random:tiny",
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    for item in overrides:
        argv += ["--set", item]
    with caplog.at_level(logging.INFO, logger="cap_jax"):
        code = cli.main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return code, "\n".join(errors)


def test_wrong_root(tmp_path, caplog):
    missing = tmp_path / "no_such_folder"
    code, message = run_command(tmp_path, caplog, "dataset=eurosat", f"data_root={missing}")
    assert code == 2
    assert "Dataset eurosat not found" in message
    assert f"No readable eurosat files under {missing}" in message
    assert "No prepared tfds dataset eurosat/rgb" in message


def test_missing_manual_download(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    code, message = run_command(tmp_path, caplog, "dataset=resisc45")
    assert code == 2
    assert "Dataset resisc45 not found" in message
    assert "manual download" in message
    assert "NWPU-RESISC45/airplane/airplane_001.jpg" in message


def test_unknown_class_names(tmp_path, caplog):
    write_folders(tmp_path / "eurosat", ["forest", "lake"])
    code, message = run_command(
        tmp_path, caplog, "dataset=eurosat", f"data_root={tmp_path / 'eurosat'}")
    assert code == 2
    assert "do not match the protocol's 10 classes" in message
    assert "class names not in the protocol: 'lake'" in message
    assert "'lake or sea'" in message


def test_one_based_labels(tmp_path, caplog):
    write_folders(tmp_path / "digits", ["1", "2", "3"])
    code, message = run_command(
        tmp_path, caplog, "dataset=digits", f"data_root={tmp_path / 'digits'}")
    assert code == 2
    assert "run 1..3 for 3 classes; they look 1-based" in message


def test_unknown_dataset_name(tmp_path, caplog):
    code, message = run_command(tmp_path, caplog, "dataset=pets")
    assert code == 2
    assert "Unknown dataset 'pets'" in message
    assert "oxford_flowers102" in message


def test_results_not_written(tmp_path, caplog):
    code, _ = run_command(tmp_path, caplog, "dataset=eurosat",
                          f"data_root={tmp_path / 'no_such_folder'}")
    assert code == 2
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_key(tmp_path, caplog):
    code, message = run_command(tmp_path, caplog, "data_dir=/data")
    assert code == 2
    assert "unknown config key(s) ['data_dir']" in message
    assert "data_root" in message


def test_unknown_config_name(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cap_jax"):
        code = cli.main(["run", "--config", "flowers_ssl", "--workdir", str(tmp_path / "run")])
    assert code == 2
    assert "flowers102_ssl" in caplog.text
