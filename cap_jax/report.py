"""Gather the `results.json` of many runs into one table, mean and standard deviation over seeds.

Runs are grouped by (dataset, paradigm, model, name without its seed suffix); the metric is
test accuracy for UL and SSL and the harmonic mean of seen and unseen accuracy for TRZSL,
next to the zero-shot baseline measured in the same runs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from typing import Iterable

import numpy as np


def headline_metrics(results: dict) -> tuple[float, float]:
    """Return (CAP metric, zero-shot metric) of one run: accuracy, or the TRZSL harmonic mean."""
    if results.get("paradigm") == "TRZSL":
        return results["test_harmonic_mean"], results["zero_shot_harmonic_mean"]
    return results["test_accuracy"], results["zero_shot_accuracy"]


def _group_name(results: dict) -> str:
    return re.sub(r"[-_]seed\d+$", "", str(results.get("name", "")))


def read_results(run_dirs: Iterable[str]) -> list[dict]:
    """Read `results.json` from each run directory (or a parent folder of run directories)."""
    found = []
    for run_dir in run_dirs:
        if os.path.isfile(os.path.join(run_dir, "results.json")):
            paths = [os.path.join(run_dir, "results.json")]
        elif os.path.isdir(run_dir):
            paths = sorted(os.path.join(root, "results.json") for root, _, files in
                           os.walk(run_dir) if "results.json" in files)
        else:
            raise FileNotFoundError(f"{run_dir} is not a run directory")
        if not paths:
            raise FileNotFoundError(f"no results.json under {run_dir}; did the run finish?")
        for path in paths:
            with open(path) as f:
                found.append(dict(json.load(f), _path=path))
    return found


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, np.float64) * 100.0
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _cell(mean: float, std: float, seeds: int) -> str:
    """Format mean ± std; a single seed has no spread to show."""
    return f"{mean:.2f} ± {std:.2f}" if seeds > 1 else f"{mean:.2f}"


def gather(run_dirs: Iterable[str]) -> tuple[str, str]:
    """Return (markdown table, CSV text) over the runs in `run_dirs`, in percent."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for results in read_results(run_dirs):
        key = (results.get("dataset"), results.get("paradigm"), results.get("model"),
               _group_name(results))
        groups[key].append(results)
    rows = []
    for (dataset, paradigm, model, name), runs in sorted(groups.items(), key=str):
        cap = [headline_metrics(r)[0] for r in runs]
        zero = [headline_metrics(r)[1] for r in runs]
        cap_mean, cap_std = _mean_std(cap)
        zero_mean, zero_std = _mean_std(zero)
        rows.append({
            "dataset": dataset, "paradigm": paradigm, "model": model, "name": name,
            "metric": "harmonic mean" if paradigm == "TRZSL" else "accuracy",
            "seeds": len(runs), "cap_mean": cap_mean, "cap_std": cap_std,
            "zero_shot_mean": zero_mean, "zero_shot_std": zero_std,
            "random_weights": any(r.get("random_weights") for r in runs),
        })
    lines = ["| dataset | paradigm | model | metric | seeds | CAP (%) | zero-shot (%) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        model = row["model"] + (" (random weights)" if row["random_weights"] else "")
        lines.append(
            f"| {row['dataset']} | {row['paradigm']} | {model} | {row['metric']} | "
            f"{row['seeds']} | {_cell(row['cap_mean'], row['cap_std'], row['seeds'])} | "
            f"{_cell(row['zero_shot_mean'], row['zero_shot_std'], row['seeds'])} |")
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return "\n".join(lines) + "\n", buffer.getvalue()
