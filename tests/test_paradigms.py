"""End-to-end runs of UL, SSL and TRZSL on a folder of generated images, and the shipped configs.

Each paradigm runs once (module fixtures) through `cap_jax.run.run` with random tiny CLIP
weights: data loading from `ROOT/train/<class>/` and `ROOT/test/<class>/`, the cached zero-shot
pass, the initial leaderboard, one or two epochs of training on the 4 fake devices of
conftest.py, checkpoints and results.json. The tests then check each paradigm's metric against a
recomputation from the saved checkpoint, and which images each stream and leaderboard holds.
"""

import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest
from image_folders import write_image_folder

from cap_jax import adapters as adapters_lib
from cap_jax import checkpoint as checkpoint_lib
from cap_jax import clip
from cap_jax import config as config_lib
from cap_jax import loop as loop_lib
from cap_jax import prompts as prompts_lib
from cap_jax import pseudolabels as pseudolabels_lib
from cap_jax import run as run_lib
from cap_jax import train as train_lib
from cap_jax.data import protocol, sources, transforms

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Class folder -> RGB colour of its images. Five classes give TRZSL int(5 * 0.62) = 3 seen ones.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 40, 220),
    "yellow": (220, 220, 40),
    "magenta": (200, 40, 200),
}
TRAIN_PER_CLASS = 8
TEST_PER_CLASS = 3
N_MAIN_SAMPLES = 3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coloured_squares")
    write_image_folder(root, COLOURS, train_per_class=TRAIN_PER_CLASS,
                       test_per_class=TEST_PER_CLASS)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Shared by the three runs, so the zero-shot pass is computed once and then read back.
    return str(tmp_path_factory.mktemp("cache"))


def tiny_config(paradigm, image_root, cache_dir, **overrides):
    values = {
        "name": f"squares_{paradigm.lower()}", "paradigm": paradigm, "dataset": "squares",
        "data_root": str(image_root), "model": "random:tiny", "prompt_depth": 2, "epochs": 2,
        "iterations_per_epoch": 2, "batch_size": 4, "eval_every": 2, "eval_batch_size": 8,
        "zero_shot_batch_size": 16, "n_main_samples": N_MAIN_SAMPLES, "update_every": 1,
        # Threshold 0 keeps every pseudolabel, so the main samples grow from the unlabeled stream.
        "threshold": 0.0, "cache_dir": cache_dir,
    }
    values.update(overrides)
    return config_lib.RunConfig(**values)


class RunRecord:
    """What one run wrote and what its epoch loop was given."""

    def __init__(self, config, workdir, results, streams, final_loop_state):
        self.config = config
        self.workdir = workdir
        self.results = results
        self.streams = streams
        self.final_loop_state = final_loop_state

    def read_json(self, name):
        with open(os.path.join(self.workdir, name)) as f:
            return json.load(f)


def run_recorded(config, workdir):
    """Run `config` through `cap_jax.run.run`, recording the streams handed to the epoch loop."""
    recorded = {}
    real_run_epochs = loop_lib.run_epochs

    def recording_run_epochs(**kwargs):
        recorded["streams"] = kwargs["streams"]
        state_r, loop_state = real_run_epochs(**kwargs)
        recorded["final_loop_state"] = loop_state
        return state_r, loop_state

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_lib, "run_epochs", recording_run_epochs)
        results = run_lib.run(config, str(workdir), progress=False)
    return RunRecord(config, str(workdir), results, recorded["streams"],
                     recorded["final_loop_state"])


@pytest.fixture(scope="module")
def data(image_root):
    return sources.load_dataset("squares", root=image_root)


@pytest.fixture(scope="module")
def ul_run(image_root, cache_dir, tmp_path_factory):
    config = tiny_config("UL", image_root, cache_dir)
    return run_recorded(config, tmp_path_factory.mktemp("ul_run"))


@pytest.fixture(scope="module")
def ssl_run(image_root, cache_dir, tmp_path_factory):
    # One epoch: the margin and its second compilation are covered by the UL and TRZSL runs.
    config = tiny_config("SSL", image_root, cache_dir, epochs=1, warmup_epochs=0, eval_every=1)
    return run_recorded(config, tmp_path_factory.mktemp("ssl_run"))


@pytest.fixture(scope="module")
def trzsl_run(image_root, cache_dir, tmp_path_factory):
    config = tiny_config("TRZSL", image_root, cache_dir)
    return run_recorded(config, tmp_path_factory.mktemp("trzsl_run"))


_FEATURE_FUNCTIONS = {}


def prompted_feature_functions(model):
    """Return jitted (text, image) feature functions of `model`, compiled once per model name."""
    if model.name not in _FEATURE_FUNCTIONS:
        module = model.module

        def text_features(clip_params, prompt_params, inputs):
            return prompts_lib.prompted_text_features(module, clip_params, prompt_params, inputs)

        def image_features(clip_params, prompt_params, images):
            return prompts_lib.prompted_image_features(module, clip_params, prompt_params, images)

        _FEATURE_FUNCTIONS[model.name] = (jax.jit(text_features), jax.jit(image_features))
    return _FEATURE_FUNCTIONS[model.name]


def checkpoint_predictions(record, data):
    """Predict the test split again from the last checkpoint, outside the run's evaluation code.

    The prompted towers run under plain `jax.jit` on one device here; the run evaluates with its
    pmapped feature steps. Both use no adapter, as the test accuracy is defined.
    """
    config = record.config
    model = clip.load(config.model)
    prompt_key, adapter_key = jax.random.split(jax.random.key(0))
    dim = model.config.embed_dim
    params = {
        "prompts": prompts_lib.init_prompt_params(
            prompt_key, model, n_ctx=config.n_ctx, depth=config.prompt_depth),
        "adapters": adapters_lib.init_adapters(
            adapter_key, dim, hidden=config.adapter_hidden or max(1, dim // 4)),
    }
    tx = train_lib.make_optimizer(
        learning_rate=config.learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_epochs * config.iterations_per_epoch,
        total_steps=config.epochs * config.iterations_per_epoch)
    target = train_lib.create_train_state(params, tx)
    checkpointer = checkpoint_lib.RunCheckpointer(
        os.path.join(record.workdir, "checkpoints"), identity={})
    state, loop_state = checkpointer.restore(target)
    checkpointer.close()
    assert loop_state.epoch == config.epochs

    prompt_params = state.params["prompts"]
    inputs = prompts_lib.class_prompt_inputs(
        model, list(data.class_names), n_ctx=config.n_ctx, template=config.template)
    text_fn, image_fn = prompted_feature_functions(model)
    text = np.array(text_fn(model.params, prompt_params, inputs))
    images = transforms.clip_preprocess(
        data.test.load_images(np.arange(len(data.test))), size=model.config.image_resolution)
    image = np.array(image_fn(model.params, prompt_params, images))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    return np.argmax(image @ text.T, axis=-1)  # [N, D] @ [D, C] -> [N, C]


def zero_shot_test_probs(cache_dir, name):
    folder = os.path.join(cache_dir, "zero_shot")
    paths = [p for p in os.listdir(folder) if p.startswith(f"{name}-test-")]
    assert len(paths) == 1, paths
    with np.load(os.path.join(folder, paths[0])) as cached:
        return cached["probs"]


def harmonic_mean(seen, unseen):
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def check_accuracy_fields(results, prefix, predictions, labels):
    accuracy = results[f"{prefix}_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(np.mean(predictions == labels))
    per_class = results[f"{prefix}_per_class_accuracy"]
    assert len(per_class) == len(COLOURS)
    for class_id, value in enumerate(per_class):
        members = labels == class_id
        assert value == pytest.approx(np.mean(predictions[members] == class_id))


# ----------------------------------------------------------------------------------------------
# UL


def test_ul_results_match_checkpoint(ul_run, data):
    results = ul_run.results
    assert results == ul_run.read_json("results.json")
    assert results["paradigm"] == "UL"
    assert results["random_weights"] is True
    assert "RANDOM weights" in results["warning"]
    assert results["test_images"] == len(COLOURS) * TEST_PER_CLASS

    labels = np.asarray(data.test.labels)
    check_accuracy_fields(results, "test", checkpoint_predictions(ul_run, data), labels)
    assert "test_harmonic_mean" not in results


def test_ul_zero_shot_matches_cache(ul_run, data, cache_dir):
    probs = zero_shot_test_probs(cache_dir, data.name)
    labels = np.asarray(data.test.labels)
    check_accuracy_fields(ul_run.results, "zero_shot", np.argmax(probs, axis=-1), labels)


def test_ul_metrics_and_leaderboard(ul_run):
    with open(os.path.join(ul_run.workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == list(range(ul_run.config.epochs))
    assert records[-1]["test_accuracy"] == ul_run.results["test_accuracy"]

    board = ul_run.read_json("initial_leaderboard.json")
    assert list(board) == sorted(COLOURS)
    for ids in board.values():
        assert len(ids) == N_MAIN_SAMPLES
        assert all(0 <= i < len(COLOURS) * TRAIN_PER_CLASS for i in ids)
    assert ul_run.streams.labeled_ids is None
    assert ul_run.streams.unlabeled_ids.tolist() == list(range(len(COLOURS) * TRAIN_PER_CLASS))


# ----------------------------------------------------------------------------------------------
# SSL


def test_ssl_accuracy_matches_checkpoint(ssl_run, data):
    results = ssl_run.results
    assert results["paradigm"] == "SSL"
    labels = np.asarray(data.test.labels)
    check_accuracy_fields(results, "test", checkpoint_predictions(ssl_run, data), labels)


def test_ssl_labeled_images_per_class(ssl_run, data):
    train_labels = np.asarray(data.train.labels)
    expected = protocol.select_labeled(train_labels, per_class=2, seed=0)
    streams = ssl_run.streams
    assert streams.labeled_ids.tolist() == expected.tolist()
    assert np.bincount(train_labels[streams.labeled_ids]).tolist() == [2] * len(COLOURS)
    assert streams.labeled_labels.tolist() == train_labels[expected].tolist()


def test_ssl_labeled_excluded_from_pool(ssl_run, data):
    labeled = set(ssl_run.streams.labeled_ids.tolist())
    unlabeled = set(ssl_run.streams.unlabeled_ids.tolist())
    assert not labeled & unlabeled
    assert labeled | unlabeled == set(range(len(data.train)))


def test_ssl_labeled_never_main_samples(ssl_run, cache_dir, data):
    labeled = set(ssl_run.streams.labeled_ids.tolist())
    board = ssl_run.read_json("initial_leaderboard.json")
    initial = {i for ids in board.values() for i in ids}
    assert initial
    assert not initial & labeled
    final = ssl_run.final_loop_state.leaderboard
    assert final.max() >= 0
    assert not set(final[final >= 0].tolist()) & labeled

    # Without the exclusion some labeled image would be a main sample, so this check can fail.
    train_probs = [p for p in os.listdir(os.path.join(cache_dir, "zero_shot"))
                   if p.startswith(f"{data.name}-train-")]
    with np.load(os.path.join(cache_dir, "zero_shot", train_probs[0])) as cached:
        unrestricted = pseudolabels_lib.initial_leaderboard(cached["probs"], N_MAIN_SAMPLES)
    assert set(unrestricted[unrestricted >= 0].tolist()) & labeled


# ----------------------------------------------------------------------------------------------
# TRZSL


def test_trzsl_split_matches_protocol(trzsl_run, data):
    seen_names, unseen_names = protocol.split_classes(list(data.class_names), 500)
    class_names = list(data.class_names)
    seen = trzsl_run.streams.seen
    assert sorted(class_names[i] for i in np.flatnonzero(seen)) == sorted(seen_names)
    assert sorted(class_names[i] for i in np.flatnonzero(~seen)) == sorted(unseen_names)
    assert int(seen.sum()) == int(len(COLOURS) * 0.62)


def test_trzsl_streams_by_class(trzsl_run, data):
    train_labels = np.asarray(data.train.labels)
    seen = trzsl_run.streams.seen
    labeled = trzsl_run.streams.labeled_ids
    assert seen[train_labels[labeled]].all()
    assert labeled.size == int(seen.sum()) * TRAIN_PER_CLASS
    assert not seen[train_labels[trzsl_run.streams.unlabeled_ids]].any()
    assert trzsl_run.streams.unlabeled_ids.size == int((~seen).sum()) * TRAIN_PER_CLASS


def test_trzsl_seen_boards_hold_labeled_images(trzsl_run, data):
    train_labels = np.asarray(data.train.labels)
    seen = trzsl_run.streams.seen
    labeled = set(trzsl_run.streams.labeled_ids.tolist())
    board = trzsl_run.read_json("initial_leaderboard.json")
    final = trzsl_run.final_loop_state.leaderboard
    for class_id, name in enumerate(data.class_names):
        ids = board[name]
        if seen[class_id]:
            assert len(ids) == N_MAIN_SAMPLES
            assert set(ids) <= labeled
            assert (train_labels[ids] == class_id).all()
            # Seen boards stay fixed through the main-sample updates.
            assert final[class_id][final[class_id] >= 0].tolist() == ids
        else:
            assert ids
            assert not set(ids) & labeled
            assert not seen[train_labels[ids]].any()


def test_trzsl_harmonic_mean_matches_checkpoint(trzsl_run, data, cache_dir):
    results = trzsl_run.results
    assert results["paradigm"] == "TRZSL"
    labels = np.asarray(data.test.labels)
    seen_test = trzsl_run.streams.seen[labels]
    zero_shot = np.argmax(zero_shot_test_probs(cache_dir, data.name), axis=-1)
    for prefix, predictions in (("test", checkpoint_predictions(trzsl_run, data)),
                                ("zero_shot", zero_shot)):
        check_accuracy_fields(results, prefix, predictions, labels)
        seen_accuracy = np.mean(predictions[seen_test] == labels[seen_test])
        unseen_accuracy = np.mean(predictions[~seen_test] == labels[~seen_test])
        assert results[f"{prefix}_seen_accuracy"] == pytest.approx(seen_accuracy)
        assert results[f"{prefix}_unseen_accuracy"] == pytest.approx(unseen_accuracy)
        assert results[f"{prefix}_harmonic_mean"] == pytest.approx(
            harmonic_mean(seen_accuracy, unseen_accuracy))
        assert 0.0 <= results[f"{prefix}_harmonic_mean"] <= 1.0


def test_accuracy_report_seen_unseen():
    # Seen classes are 0 and 2. Two of the 4 seen test images and all 3 unseen ones are right.
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    predictions = np.array([0, 1, 1, 1, 2, 0, 3])
    seen = np.array([True, False, True, False])
    report = run_lib.accuracy_report(predictions, labels, 4, seen=seen, prefix="test")
    assert report["test_accuracy"] == pytest.approx(5 / 7)
    assert report["test_per_class_accuracy"] == pytest.approx([0.5, 1.0, 0.5, 1.0])
    assert report["test_seen_accuracy"] == pytest.approx(0.5)
    assert report["test_unseen_accuracy"] == pytest.approx(1.0)
    assert report["test_harmonic_mean"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


# ----------------------------------------------------------------------------------------------
# Shipped configs


BENCHMARKS = ("flowers102", "resisc45", "dtd", "eurosat", "cub", "fgvc_aircraft")


def load_make_configs():
    path = os.path.join(REPOSITORY, "experiments", "make_configs.py")
    spec = importlib.util.spec_from_file_location("make_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_config_names():
    folder = config_lib.config_dir()
    return sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".json"))


@pytest.mark.parametrize("name", shipped_config_names())
def test_shipped_config_loads(name):
    config = config_lib.load_config(name)
    assert config.name == name
    # Raises for a dataset name that load_dataset does not know.
    protocol.canonical_name(config.dataset)


def test_benchmark_configs_complete():
    names = set(shipped_config_names())
    for dataset in BENCHMARKS:
        for paradigm in ("UL", "SSL", "TRZSL"):
            name = f"{dataset}_{paradigm.lower()}"
            assert name in names
            assert config_lib.load_config(name).paradigm == paradigm


def test_benchmark_configs_match_generator():
    generated = load_make_configs().benchmark_configs()
    assert len(generated) == 18
    for name, values in generated.items():
        with open(os.path.join(config_lib.config_dir(), f"{name}.json")) as f:
            assert json.load(f) == values, f"rerun experiments/make_configs.py for {name}"


def test_benchmark_config_settings():
    defaults = config_lib.RunConfig()
    for paradigm in ("ul", "ssl", "trzsl"):
        flowers = config_lib.load_config(f"flowers102_{paradigm}")
        assert flowers.n_main_samples == 6
        assert flowers.margin_scale == 12.0
        aircraft = config_lib.load_config(f"fgvc_aircraft_{paradigm}")
        assert aircraft.threshold == 0.5
        assert aircraft.max_main_ratio == 0.6
        assert aircraft.margin_scale == 14.0
        assert aircraft.n_main_samples == 16
        for dataset in ("resisc45", "dtd", "eurosat", "cub"):
            config = config_lib.load_config(f"{dataset}_{paradigm}")
            assert config.n_main_samples == 16
            assert config.threshold == 0.85
            assert config.max_main_ratio == 0.8
            assert config.margin_scale == 12.0
        for config in (flowers, aircraft):
            assert config.model == "openai/clip-vit-base-patch32"
            assert (config.epochs, config.iterations_per_epoch, config.batch_size) == (
                defaults.epochs, defaults.iterations_per_epoch, defaults.batch_size)
            assert config.learning_rate == defaults.learning_rate


def test_config_warmup_shorter_than_training():
    with pytest.raises(ValueError, match="warmup_epochs must be at least 0 and less than epochs"):
        config_lib.load_config("flowers102_ul", ["epochs=1"])
    assert config_lib.load_config("flowers102_ul", ["epochs=1", "warmup_epochs=0"]).epochs == 1


def test_config_selected_by_name_with_overrides():
    config = config_lib.load_config("flowers102_ssl", ["model=/models/clip", "seed=3"])
    assert config.paradigm == "SSL"
    assert protocol.canonical_name(config.dataset) == "oxford_flowers102"
    assert config.model == "/models/clip"
    assert config.seed == 3
    assert math.isclose(config.threshold, 0.85)
