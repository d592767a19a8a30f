"""Tests of the simulated CAP benchmark: the simulated flaws, and the directions of the method.

The direction tests train FPL-style, CAP and CAP without alignment through the real train step
and loop on one device. They use the benchmark's default task and schedule with half the images
per class (seeds 0 and 1), which keeps the test short.
"""

import csv
import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest

from cap_jax import simulation as sim

SEEDS = (0, 1)
TRAINED = ("fpl", "cap", "cap_no_alignment")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config():
    return sim.SimulationConfig(train_per_class=100, test_per_class=50)


@pytest.fixture(scope="module")
def worlds(config):
    return {seed: sim.make_world(config, seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def detected(worlds, config):
    return {seed: sim.detect_mismatched(world, logit_scale=config.logit_scale)
            for seed, world in worlds.items()}


@pytest.fixture(scope="module")
def results(worlds, detected, config):
    cache = sim.StepCache(config, devices=jax.local_devices()[:1])
    out = {}
    for seed, world in worlds.items():
        for name in TRAINED:
            out[name, seed] = sim.run_method(world, sim.method_by_name(name), config, seed,
                                             cache=cache, detected=detected[seed])
    return out


# ----------------------------------------------------------------------------------------------
# The simulated world.


def test_world_features_are_unit(worlds):
    world = worlds[0]
    for name in ("centers", "text_features", "descriptions", "train_features", "test_features"):
        norms = np.linalg.norm(getattr(world, name), axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5, err_msg=name)


def test_world_is_seeded(config):
    first = sim.make_world(config, 3)
    again = sim.make_world(config, 3)
    other = sim.make_world(config, 4)
    np.testing.assert_array_equal(first.train_features, again.train_features)
    np.testing.assert_array_equal(first.mismatched, again.mismatched)
    assert not np.allclose(first.train_features, other.train_features)


def test_mismatched_text_is_orthogonal_to_clusters(worlds):
    world = worlds[0]
    cosines = world.text_features[world.mismatched] @ world.centers.T
    np.testing.assert_allclose(cosines, 0.0, atol=1e-5)


def test_zero_shot_rarely_predicts_mismatched(worlds, config):
    world = worlds[0]
    probs = sim.zero_shot_probabilities(world.train_features, world.text_features,
                                        config.logit_scale)
    counts = np.bincount(probs.argmax(axis=1), minlength=world.num_classes)
    # A faithful class gets about train_per_class predictions; a mismatched one under 10% of that.
    assert counts[world.mismatched].max() < 0.1 * config.train_per_class


def test_zero_shot_favours_dominant_class_of_pair(worlds):
    world = worlds[0]
    predictions = np.argmax(world.test_features @ world.text_features.T, axis=1)
    for dominant, minority in world.confused_pairs:
        dominant_recall = np.mean(predictions[world.test_labels == dominant] == dominant)
        minority_recall = np.mean(predictions[world.test_labels == minority] == minority)
        assert minority_recall < dominant_recall, (dominant, minority)


def test_config_rejects_unknown_key(tmp_path):
    path = tmp_path / "simulation.json"
    path.write_text(json.dumps({"num_classes": 12, "clases": 3}))
    with pytest.raises(ValueError, match="clases"):
        sim.load_config(str(path))


def test_config_overrides_parse_json():
    config = sim.load_config(None, ["epochs=3", "image_noise=1.5"])
    assert config.epochs == 3
    assert config.image_noise == 1.5


def test_config_rejects_small_dim():
    with pytest.raises(ValueError, match="dim"):
        sim.SimulationConfig(num_classes=20, dim=20)


# ----------------------------------------------------------------------------------------------
# Towers and image source.


def test_untrained_towers_are_frozen_features(worlds, config):
    world = worlds[0]
    towers = sim.FeatureTowers()
    prompts = sim.init_prompts(config.dim)
    frozen = {"text_features": world.text_features}
    text = jax.jit(towers.text_features)(frozen, prompts)
    images = jax.jit(towers.image_features)(frozen, prompts, world.test_features[:8])
    np.testing.assert_allclose(text, world.text_features, atol=1e-6)
    np.testing.assert_allclose(images, world.test_features[:8], atol=1e-6)


def test_strong_view_is_unit_seeded_and_perturbed(worlds, config):
    world = worlds[0]
    source = sim.FeatureSource(world.train_features, config.strong_noise, config.strong_keep)
    ids = np.arange(16)
    first = source.strong(ids, np.random.default_rng(5))
    again = source.strong(ids, np.random.default_rng(5))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(first * source.clean(ids), axis=1)
    assert np.all(cosine < 0.99)
    assert np.all(cosine > 0.2)


# ----------------------------------------------------------------------------------------------
# Directions of the method.


def test_detection_has_no_false_positive(worlds, detected):
    for seed, world in worlds.items():
        assert set(detected[seed]) <= set(world.mismatched), seed


def test_detection_finds_a_mismatched_class(worlds, detected):
    found = sum(len(set(detected[s]) & set(worlds[s].mismatched)) for s in SEEDS)
    assert found >= 1


def test_train_step_runs_in_every_epoch(results, config):
    for (name, seed), result in results.items():
        assert len(result["history"]) == config.epochs, (name, seed)
        assert all(math.isfinite(h["loss"]) for h in result["history"]), (name, seed)


def test_fpl_baseline_keeps_no_pseudolabel(results):
    for seed in SEEDS:
        history = results["fpl", seed]["history"]
        assert all(h["kept_fraction"] == 0.0 for h in history)
        assert {h["main_samples"] for h in history} == {history[0]["main_samples"]}


def test_cap_accuracy_above_fpl(results):
    for seed in SEEDS:
        cap = results["cap", seed]["test_accuracy"]
        fpl = results["fpl", seed]["test_accuracy"]
        assert cap > fpl, (seed, cap, fpl)


def test_cap_balance_above_fpl(results):
    for key in ("balance_min_over_max", "balance_normalized_entropy"):
        cap = np.mean([results["cap", seed][key] for seed in SEEDS])
        fpl = np.mean([results["fpl", seed][key] for seed in SEEDS])
        assert cap > fpl, (key, cap, fpl)


def test_alignment_recovers_detected_classes(results, worlds, detected):
    checked = 0
    for seed in SEEDS:
        recovered = np.intersect1d(detected[seed], worlds[seed].mismatched)
        with_alignment = np.asarray(results["cap", seed]["per_class_accuracy"])
        without = np.asarray(results["cap_no_alignment", seed]["per_class_accuracy"])
        for c in recovered:
            assert with_alignment[c] >= 0.5, (seed, c, with_alignment[c])
            assert without[c] <= 0.3, (seed, c, without[c])
            checked += 1
    assert checked >= 1


# ----------------------------------------------------------------------------------------------
# Summaries and the command.


def test_summarize_mean_and_std():
    runs = []
    for seed, accuracy in enumerate((0.5, 0.7)):
        run = {key: 0.0 for key, _ in sim.SUMMARY_METRICS}
        run.update(method="cap", seed=seed, test_accuracy=accuracy, mismatched_accuracy=math.nan)
        runs.append(run)
    (row,) = sim.summarize(runs)
    assert row["seeds"] == 2
    assert row["test_accuracy_mean"] == pytest.approx(0.6)
    assert row["test_accuracy_std"] == pytest.approx(0.1)
    assert math.isnan(row["mismatched_accuracy_mean"])
    assert "0.600 ± 0.100" in sim.markdown_table([row])


def test_command_writes_table_and_plot(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "simulate", os.path.join(REPO, "experiments", "simulate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "out"
    overrides = ["num_classes=10", "dim=24", "train_per_class=40", "test_per_class=10",
                 "num_mismatched=1", "num_confused_pairs=1", "epochs=2",
                 "iterations_per_epoch=2", "batch_size=8"]
    argv = ["--output", str(output), "--seeds", "1", "--methods", "zero_shot,fpl",
            "--devices", "1"]
    for item in overrides:
        argv += ["--set", item]
    assert module.main(argv) == 0

    for name in ("config.json", "results.json", "summary.md", "summary.csv",
                 "pseudolabel_counts.png"):
        assert (output / name).is_file(), name
    with open(output / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["method"] for row in rows] == ["zero_shot", "fpl"]
    assert 0.0 <= float(rows[0]["test_accuracy_mean"]) <= 1.0
    saved = json.loads((output / "config.json").read_text())
    assert saved["num_classes"] == 10
