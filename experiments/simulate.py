"""Run the controlled CAP benchmark on a simulated vision-language model.

Every method of `cap_jax.simulation.METHODS` runs on the same simulated tasks, one per seed,
through the train step and epoch loop of a real run. Writes into --output:

  config.json              the simulation settings
  results.json             every run: scores, detected classes, per-epoch history
  summary.csv, summary.md  mean and standard deviation over seeds, one row per method
  pseudolabel_counts.png   per-class confident pseudolabels over epochs (zero-shot, FPL-style,
                           CAP) on the first seed's task

Example:
  python experiments/simulate.py --output /tmp/cap_simulation --seeds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time

import numpy as np

from cap_jax.run import json_safe

log = logging.getLogger("simulate")

PLOTTED_METHODS = ("zero_shot", "fpl", "cap")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory for the results (created)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of simulated tasks; seeds 0 .. N-1 (default 3)")
    parser.add_argument("--config", default=None,
                        help="JSON file of SimulationConfig fields (default: the built-in ones)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one SimulationConfig field")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: all)")
    parser.add_argument("--devices", type=int, default=None,
                        help="use the first N local devices (default: all)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


class _DropMessage(logging.Filter):
    """Drop log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def plot_counts(results: list[dict], world, path: str) -> None:
    """Plot per-class confident pseudolabel counts over epochs, one panel per plotted method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cap_jax.simulation import method_by_name

    runs = {r["method"]: r for r in results if r["method"] in PLOTTED_METHODS}
    methods = [m for m in PLOTTED_METHODS if m in runs]
    if not methods:
        log.warning("no plotted method (%s) was run; skipping the plot", ", ".join(PLOTTED_METHODS))
        return
    mismatched = set(world.mismatched.tolist())
    dominant = set(world.confused_pairs[:, 0].tolist())
    minority = set(world.confused_pairs[:, 1].tolist())

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], methods):
        counts = np.array([h["pool_counts"] for h in runs[name]["history"]])  # [E, C]
        epochs = np.arange(1, counts.shape[0] + 1)
        for c in range(counts.shape[1]):
            if c in mismatched:
                style = {"color": "tab:red", "lw": 2.0, "label": "mismatched"}
            elif c in minority:
                style = {"color": "tab:orange", "lw": 2.0, "label": "confused, minority"}
            elif c in dominant:
                style = {"color": "tab:blue", "lw": 1.5, "label": "confused, dominant"}
            else:
                style = {"color": "0.7", "lw": 0.8, "label": "other"}
            ax.plot(epochs, counts[:, c], **style)
        ax.set_title(method_by_name(name).label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("confident pseudolabels per class\n(unlabeled pool)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The baselines train without self-training (threshold 1), so the loop would warn every epoch.
    logging.getLogger("cap_jax.loop").addFilter(
        _DropMessage("no unlabeled sample was above the confidence threshold"))

    import jax

    from cap_jax import simulation as sim

    config = sim.load_config(args.config, args.overrides)
    methods = list(sim.METHODS)
    if args.methods:
        methods = [sim.method_by_name(name.strip()) for name in args.methods.split(",")]
    devices = jax.local_devices()
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            raise SystemExit(f"--devices must lie in [1, {len(devices)}], got {args.devices}")
        devices = devices[:args.devices]
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
        f.write("\n")
    log.info("simulation: %s", json.dumps(config.to_dict(), sort_keys=True))
    log.info("%d seeds, methods %s, %d device(s)", args.seeds, [m.name for m in methods],
             len(devices))

    started = time.time()
    cache = sim.StepCache(config, devices=devices)
    results = []
    first_world = None
    for seed in range(args.seeds):
        world = sim.make_world(config, seed)
        first_world = first_world or world
        detected = None
        if any(m.align for m in methods):
            detected = sim.detect_mismatched(world, logit_scale=config.logit_scale)
            log.info("seed %d: mismatched classes %s, detected %s", seed,
                     world.mismatched.tolist(), detected.tolist())
        for method in methods:
            result = sim.run_method(world, method, config, seed, cache=cache, detected=detected)
            result["true_mismatched"] = world.mismatched.tolist()
            result["confused_pairs"] = world.confused_pairs.tolist()
            results.append(result)
            log.info("seed %d %-18s test %.3f  mismatched %.3f  confused %.3f  balance %.3f "
                     "(%.1f s)", seed, method.name, result["test_accuracy"],
                     result["mismatched_accuracy"], result["confused_accuracy"],
                     result["balance_min_over_max"], result["seconds"])
    seconds = time.time() - started

    rows = sim.summarize(results)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(json_safe({"config": config.to_dict(), "seconds": seconds, "runs": results}),
                  f, indent=1)
        f.write("\n")
    header, table = sim.csv_rows(rows)
    with open(os.path.join(args.output, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    markdown = sim.markdown_table(rows)
    with open(os.path.join(args.output, "summary.md"), "w") as f:
        f.write(markdown)
    plot_counts([r for r in results if r["seed"] == 0], first_world,
                os.path.join(args.output, "pseudolabel_counts.png"))
    print(markdown)
    log.info("done in %.1f s; results in %s", seconds, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
