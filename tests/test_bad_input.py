"""Bad input stops `cap-jax run` with a message that says what to fix, before any compute.

Every case goes through the command in this process (`cli.main`) on a folder of generated
images with random tiny CLIP weights, or through `run.run` with data passed in. A run that
started computing logs "zero-shot pass" into run.log before its first batch, so the absence of
that line shows that a check came first.
"""

import json
import logging
import os
import re
import types

import numpy as np
import pytest
from image_folders import COLOURS, write_image_folder

from cap_jax import checkpoint as checkpoint_lib
from cap_jax import cli
from cap_jax import config as config_lib
from cap_jax import loop as loop_lib
from cap_jax import run as run_lib
from cap_jax.data import ImageDataset, sources


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    write_image_folder(root)
    return root


def base_config(tmp_path, image_root, **overrides):
    values = dict(
        name="bad_input", dataset="squares", data_root=str(image_root), model="random:tiny",
        prompt_depth=2, epochs=2, iterations_per_epoch=1, batch_size=4, eval_batch_size=4,
        zero_shot_batch_size=4, n_main_samples=2, cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return values


def run_cli(tmp_path, caplog, config, *overrides):
    """Run `cap-jax run` on `config` (a dict); return (exit code, error messages, workdir)."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    workdir = tmp_path / "run"
    argv = ["run", "--config", str(config_path), "--workdir", str(workdir), "--no-progress"]
    for item in overrides:
        argv += ["--set", item]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cap_jax"):
        code = cli.main(argv)
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    return code, errors, workdir


def run_log(workdir):
    return (workdir / "run.log").read_text()


def assert_no_compute(workdir):
    log = run_log(workdir)
    assert "zero-shot pass" not in log
    assert "compiling the train step" not in log


# ----------------------------------------------------------------------------------------------
# Config and devices.


def test_batch_not_divisible_by_devices(tmp_path, caplog, image_root):
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, image_root),
                                    "batch_size=6")
    assert code == 2
    assert "batch_size 6 does not divide over the 4 local devices" in errors
    assert "choose a multiple of 4" in errors
    assert "data:" not in run_log(workdir)
    assert_no_compute(workdir)


def test_unknown_config_key_on_command_line(tmp_path, caplog, image_root):
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, image_root),
                                    "lerning_rate=0.1")
    assert code == 2
    assert "unknown config key(s) ['lerning_rate']" in errors
    assert "learning_rate" in errors  # the valid keys are listed
    assert not workdir.exists()


def test_unknown_config_key_in_file(tmp_path, caplog, image_root):
    config = base_config(tmp_path, image_root, treshold=0.5)
    code, errors, workdir = run_cli(tmp_path, caplog, config)
    assert code == 2
    assert "unknown config key(s) ['treshold']" in errors
    assert str(tmp_path / "config.json") in errors
    assert not workdir.exists()


def test_pool_smaller_than_batch(tmp_path, caplog, image_root):
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, image_root),
                                    "batch_size=32")
    assert code == 2
    assert "the unlabeled pool has 16 images, fewer than batch_size 32" in errors
    assert_no_compute(workdir)


# ----------------------------------------------------------------------------------------------
# Datasets: missing, duplicate class names, labels, bad image files.


@pytest.mark.parametrize("dataset, hint", [
    ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
    ("resisc45", "NWPU-RESISC45"),
    ("dtd", "tfds"),
])
def test_missing_dataset_names_location(tmp_path, caplog, image_root, dataset, hint):
    missing = tmp_path / "nowhere"
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, image_root),
                                    f"dataset={dataset}", f"data_root={missing}")
    assert code == 2
    assert str(missing) in errors
    assert hint in errors
    assert "data_root" in errors
    assert_no_compute(workdir)


def test_duplicate_class_folders(tmp_path, caplog):
    root = tmp_path / "images"
    write_image_folder(root, {"sea_lake": (0, 0, 200), "sea lake": (0, 0, 220),
                              "forest": (0, 200, 0)})
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, root))
    assert code == 2
    assert "Duplicate class names" in errors
    assert "'sea lake'" in errors
    assert str(root) in errors
    assert_no_compute(workdir)


class LabeledSplit:
    """A split that only has labels, enough for the checks that run before any image is read."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)


def test_run_rejects_duplicate_class_names(tmp_path, image_root):
    data = types.SimpleNamespace(name="toy", class_names=("Sea Lake", "forest", "sea_lake"),
                                 train=LabeledSplit([0, 1, 2, 0]), test=LabeledSplit([0, 1, 2]))
    config = config_lib.RunConfig(**base_config(tmp_path, image_root))
    with pytest.raises(ValueError, match="Duplicate class names.*'Sea Lake' and 'sea_lake'"):
        run_lib.run(config, str(tmp_path / "run"), progress=False, data=data)
    assert_no_compute(tmp_path / "run")
    assert "RANDOM weights" not in run_log(tmp_path / "run")  # stopped before loading CLIP


def test_run_rejects_labels_outside_range(tmp_path, image_root):
    data = types.SimpleNamespace(name="toy", class_names=("a", "b", "c"),
                                 train=LabeledSplit([0, 1, 2, 0]), test=LabeledSplit([0, 3, -1]))
    config = config_lib.RunConfig(**base_config(tmp_path, image_root))
    with pytest.raises(ValueError, match=r"test labels of toy must lie in 0\.\.2 for 3 classes; "
                                         r"found \[-1, 3\]"):
        run_lib.run(config, str(tmp_path / "run"), progress=False, data=data)
    assert_no_compute(tmp_path / "run")


def test_labels_outside_class_range_in_dataset():
    with pytest.raises(ValueError, match=r"Labels must lie in 0\.\.2 for 3 class names"):
        ImageDataset(("a", "b", "c"), np.zeros((2, 4, 4), np.uint8), np.array([0, 3]))


def test_numbered_class_folders_outside_range(tmp_path, caplog):
    root = tmp_path / "images"
    write_image_folder(root, {"0": (200, 0, 0), "1": (0, 200, 0), "7": (0, 0, 200)})
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, root))
    assert code == 2
    assert "must lie in 0..2 for 3 classes; found 7" in errors
    assert_no_compute(workdir)


def truncate_one_image(root):
    path = root / "train" / "red" / "red_1.png"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def test_truncated_image_named_with_its_path(tmp_path, caplog):
    root = tmp_path / "images"
    write_image_folder(root)
    path = truncate_one_image(root)
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, root))
    assert code == 2
    assert f"Failed to read image {path}" in errors
    assert "skip_bad_images=true" in errors
    assert f"Failed to read image {path}" in run_log(workdir)
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_truncated_image_skipped_when_asked(tmp_path, caplog):
    root = tmp_path / "images"
    write_image_folder(root)
    path = truncate_one_image(root)
    with caplog.at_level(logging.WARNING, logger="cap_jax"):
        data = sources.load_dataset("squares", root=root, skip_bad_images=True)
    assert len(data.train) == 4 * len(COLOURS) - 1
    assert str(path) in caplog.text
    # Through a run, loading goes on without the file. The too-long template then stops the
    # run before the zero-shot pass, so this test needs no compute.
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, root),
                                    "skip_bad_images=true", "template=" + "very " * 80 + "{}")
    assert "data: squares, 4 classes, 15 training images" in run_log(workdir)
    assert str(path) in run_log(workdir)
    assert code == 2
    assert "too long" in errors


# ----------------------------------------------------------------------------------------------
# Texts longer than CLIP's context.


def test_prompt_too_long_names_class_and_count(tmp_path, caplog, image_root):
    template = "a photo of a very " + "very " * 75 + "{}."
    code, errors, workdir = run_cli(tmp_path, caplog, base_config(tmp_path, image_root),
                                    f"template={template}")
    assert code == 2
    assert "the prompt of class 'blue' is too long" in errors
    count = int(re.search(r"has (\d+) tokens", errors).group(1))
    assert count > 77
    assert "context length 77" in errors
    assert_no_compute(workdir)


def test_description_too_long_names_class_and_count(tmp_path, caplog, image_root):
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({
        "red": ["a red square on grey noise"],
        "green": ["a square of a green that is " + "very " * 80 + "bright"],
    }))
    config = base_config(tmp_path, image_root, concept_alignment="detect",
                         descriptions=str(descriptions))
    code, errors, workdir = run_cli(tmp_path, caplog, config)
    assert code == 2
    assert "the description of class 'green' is too long" in errors
    assert int(re.search(r"has (\d+) tokens", errors).group(1)) > 77
    assert_no_compute(workdir)


# ----------------------------------------------------------------------------------------------
# Checkpoints of another run.


def write_checkpoint(workdir, config, identity):
    """Put a config and a checkpoint after epoch 0 with `identity` into `workdir`."""
    os.makedirs(workdir)
    config_lib.save_config(config_lib.RunConfig(**config), str(workdir / "config.json"))
    checkpointer = checkpoint_lib.RunCheckpointer(str(workdir / "checkpoints"), identity)
    checkpointer.save({"w": np.zeros(3, np.float32)},
                      loop_lib.LoopState(epoch=1, leaderboard=np.zeros((4, 2), np.int64),
                                         counts=np.zeros(4, np.int64)))
    checkpointer.close()


def run_identity(**changes):
    identity = {"model": "random:tiny", "class_names": sorted(COLOURS), "paradigm": "UL",
                "dataset": "squares"}
    identity.update(changes)
    return identity


def test_checkpoint_of_other_class_list(tmp_path, caplog, image_root):
    config = base_config(tmp_path, image_root)
    other = ["blue", "green", "red", "purple"]
    write_checkpoint(tmp_path / "run", config, run_identity(class_names=other))
    code, errors, workdir = run_cli(tmp_path, caplog, config)
    assert code == 2
    assert f"was written with class_names={other!r}" in errors
    assert f"this run has class_names={sorted(COLOURS)!r}" in errors
    assert str(workdir / "checkpoints" / "1") in errors
    assert_no_compute(workdir)
    assert os.listdir(workdir / "checkpoints") == ["1"]


def test_checkpoint_of_other_model(tmp_path, caplog, image_root):
    config = base_config(tmp_path, image_root)
    write_checkpoint(tmp_path / "run", config, run_identity(model="random:ViT-B/32"))
    code, errors, workdir = run_cli(tmp_path, caplog, config)
    assert code == 2
    assert "was written with model='random:ViT-B/32', but this run has model='random:tiny'" in (
        errors)
    assert_no_compute(workdir)


def test_workdir_of_run_with_other_config(tmp_path, caplog, image_root):
    config = base_config(tmp_path, image_root)
    write_checkpoint(tmp_path / "run", dict(config, model="random:ViT-B/32"), run_identity())
    code, errors, _ = run_cli(tmp_path, caplog, config)
    assert code == 2
    assert "contains a run with another config (model: 'random:ViT-B/32' -> 'random:tiny')" in (
        errors)
    assert "use another --workdir" in errors
