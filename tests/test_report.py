"""`cap-jax table`: results.json files of many runs gathered into markdown and CSV tables."""

import csv
import json
import logging

import numpy as np
import pytest

from cap_jax import cli

MODEL = "openai/clip-vit-base-patch32"


def write_results(folder, **values):
    folder.mkdir(parents=True)
    with open(folder / "results.json", "w") as f:
        json.dump(values, f)


def ssl_results(name, seed, accuracy, zero_shot):
    return {"name": name, "paradigm": "SSL", "dataset": "oxford_flowers102", "model": MODEL,
            "seed": seed, "random_weights": False, "test_accuracy": accuracy,
            "zero_shot_accuracy": zero_shot}


def trzsl_results(seed, harmonic_mean, zero_shot_harmonic_mean):
    # Accuracies over all classes differ from the harmonic means, so a table that used them
    # would show other numbers.
    return {"name": "dtd_trzsl", "paradigm": "TRZSL", "dataset": "dtd", "model": MODEL,
            "seed": seed, "random_weights": False, "test_accuracy": 0.99,
            "zero_shot_accuracy": 0.98, "test_seen_accuracy": 0.9, "test_unseen_accuracy": 0.5,
            "test_harmonic_mean": harmonic_mean,
            "zero_shot_harmonic_mean": zero_shot_harmonic_mean}


def percent_mean_std(values):
    array = np.asarray(values) * 100
    return array.mean(), array.std(ddof=1)


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    ssl = [(1, 0.70, 0.60), (2, 0.80, 0.62), (3, 0.75, 0.61)]
    for seed, accuracy, zero_shot in ssl:
        write_results(root / "flowers102_ssl" / f"seed{seed}",
                      **ssl_results("flowers102_ssl", seed, accuracy, zero_shot))
    trzsl = [(1, 0.60, 0.40), (2, 0.64, 0.44)]
    for seed, harmonic_mean, zero_shot in trzsl:
        # One run has its seed in its name, and the table still groups it with the other.
        name_dir = root / "dtd_trzsl" / f"seed{seed}"
        values = trzsl_results(seed, harmonic_mean, zero_shot)
        if seed == 2:
            values["name"] = "dtd_trzsl_seed2"
        write_results(name_dir, **values)
    return root, ssl, trzsl


def read_csv_rows(path):
    with open(path, newline="") as f:
        return {row["dataset"]: row for row in csv.DictReader(f)}


def test_table_writes_markdown_and_csv(runs, tmp_path, capsys):
    root, _, _ = runs
    prefix = tmp_path / "table"
    assert cli.main(["table", str(root), "--output", str(prefix)]) == 0

    markdown = (tmp_path / "table.md").read_text()
    assert markdown == capsys.readouterr().out.rstrip("\n") + "\n"
    lines = markdown.splitlines()
    assert lines[0].startswith("| dataset | paradigm | model |")
    assert len(lines) == 2 + 2
    rows = read_csv_rows(tmp_path / "table.csv")
    assert set(rows) == {"oxford_flowers102", "dtd"}


def test_table_mean_std_over_seeds(runs, tmp_path):
    root, ssl, _ = runs
    assert cli.main(["table", str(root), "--output", str(tmp_path / "table")]) == 0
    row = read_csv_rows(tmp_path / "table.csv")["oxford_flowers102"]

    cap_mean, cap_std = percent_mean_std([accuracy for _, accuracy, _ in ssl])
    zero_mean, zero_std = percent_mean_std([zero_shot for _, _, zero_shot in ssl])
    assert row["paradigm"] == "SSL"
    assert row["metric"] == "accuracy"
    assert int(row["seeds"]) == 3
    assert float(row["cap_mean"]) == pytest.approx(cap_mean)
    assert float(row["cap_std"]) == pytest.approx(cap_std)
    assert float(row["zero_shot_mean"]) == pytest.approx(zero_mean)
    assert float(row["zero_shot_std"]) == pytest.approx(zero_std)

    markdown = (tmp_path / "table.md").read_text()
    assert f"| {cap_mean:.2f} ± {cap_std:.2f} | {zero_mean:.2f} ± {zero_std:.2f} |" in markdown


def test_table_trzsl_harmonic_mean(runs, tmp_path):
    root, _, trzsl = runs
    assert cli.main(["table", str(root), "--output", str(tmp_path / "table")]) == 0
    row = read_csv_rows(tmp_path / "table.csv")["dtd"]

    cap_mean, cap_std = percent_mean_std([hm for _, hm, _ in trzsl])
    zero_mean, _ = percent_mean_std([zero_shot for _, _, zero_shot in trzsl])
    assert row["metric"] == "harmonic mean"
    assert row["name"] == "dtd_trzsl"
    assert int(row["seeds"]) == 2
    assert float(row["cap_mean"]) == pytest.approx(cap_mean)
    assert float(row["cap_std"]) == pytest.approx(cap_std)
    assert float(row["zero_shot_mean"]) == pytest.approx(zero_mean)


def test_table_single_run_and_random_weights(tmp_path):
    run_dir = tmp_path / "quick"
    write_results(run_dir, name="fashion_mnist_ul_quick", paradigm="UL", dataset="fashion_mnist",
                  model="random:ViT-B/32", seed=1, random_weights=True, test_accuracy=0.125,
                  zero_shot_accuracy=0.1)
    assert cli.main(["table", str(run_dir), "--output", str(tmp_path / "table")]) == 0
    row = read_csv_rows(tmp_path / "table.csv")["fashion_mnist"]
    assert int(row["seeds"]) == 1
    assert float(row["cap_mean"]) == pytest.approx(12.5)
    assert float(row["cap_std"]) == 0.0
    assert row["random_weights"] == "True"
    assert "random:ViT-B/32 (random weights)" in (tmp_path / "table.md").read_text()


def test_table_different_names_not_merged(tmp_path):
    for name, accuracy in (("flowers102_ssl", 0.7), ("flowers102_ssl_lr0.02", 0.5)):
        write_results(tmp_path / name, **ssl_results(name, 1, accuracy, 0.6))
    assert cli.main(["table", str(tmp_path), "--output", str(tmp_path / "table")]) == 0
    with open(tmp_path / "table.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"flowers102_ssl", "flowers102_ssl_lr0.02"}
    assert float(rows["flowers102_ssl_lr0.02"]["cap_mean"]) == pytest.approx(50.0)


def test_table_unfinished_run(tmp_path, caplog):
    (tmp_path / "unfinished").mkdir()
    with caplog.at_level(logging.INFO, logger="cap_jax"):
        code = cli.main(["table", str(tmp_path / "unfinished")])
    assert code == 2
    assert "no results.json under" in caplog.text
