"""Write the 18 benchmark configs: six datasets times the UL, SSL and TRZSL paradigms.

Each config `experiments/configs/<dataset>_<paradigm>.json` sets the name, paradigm, dataset and
model, and only those settings that differ from the defaults of `cap_jax.config.RunConfig`. The
defaults are the reference's CAP schedule: 50 epochs of 50 iterations, batch 32, SGD at 0.01,
confidence threshold 0.85, 16 initial main samples per class and margin scale 12. The
per-dataset settings follow the reference code: 6 initial main samples for Flowers102, and for
FGVC-Aircraft a threshold of 0.5, a maximum main-sample ratio of 0.6 and a margin scale of 14.

Run it after changing a setting here, so the shipped files stay in step (a test compares them):

  python experiments/make_configs.py [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os

MODEL = "openai/clip-vit-base-patch32"

PARADIGMS = {
    "ul": ("UL", "unsupervised learning. Every training image is unlabeled"),
    "ssl": ("SSL", ("semi-supervised learning. Two images per class, drawn with seed 0, are "
                    "labeled and the rest unlabeled")),
    "trzsl": ("TRZSL", ("transductive zero-shot learning. The images of 62% of the classes, "
                        "drawn with split seed 500, are labeled and the others unlabeled. The "
                        "metric is the harmonic mean of seen and unseen test accuracy")),
}

# Config stem -> (dataset name for cap_jax.data.sources.load_dataset, readable name, settings
# that differ from the RunConfig defaults).
DATASETS = {
    "flowers102": ("oxford_flowers102", "Oxford Flowers102", {"n_main_samples": 6}),
    "resisc45": ("resisc45", "RESISC45", {}),
    "dtd": ("dtd", "DTD", {}),
    "eurosat": ("eurosat", "EuroSAT", {}),
    "cub": ("caltech_birds2011", "CUB-200-2011", {}),
    "fgvc_aircraft": ("fgvc_aircraft", "FGVC-Aircraft",
                      {"threshold": 0.5, "max_main_ratio": 0.6, "margin_scale": 14.0}),
}


def benchmark_configs() -> dict[str, dict]:
    """Return the 18 configs as {file stem: JSON object}, in dataset then paradigm order."""
    configs = {}
    for stem, (dataset, title, settings) in DATASETS.items():
        for suffix, (paradigm, description) in PARADIGMS.items():
            name = f"{stem}_{suffix}"
            configs[name] = {
                "_comment": (
                    f"CAP on {title} with the reference's schedule and settings for this "
                    f"dataset. {paradigm}: {description}. Point model at a local copy of {MODEL} "
                    "with --set model=DIR, and data_root at the data when it is not in the "
                    "default tfds folder."),
                "name": name,
                "paradigm": paradigm,
                "dataset": dataset,
                "model": MODEL,
                **settings,
            }
    return configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
        help="folder to write the JSON files into (default: experiments/configs)")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    for name, values in benchmark_configs().items():
        with open(os.path.join(args.output, f"{name}.json"), "w") as f:
            json.dump(values, f, indent=2)
            f.write("\n")
    print(f"wrote {len(benchmark_configs())} configs to {args.output}")


if __name__ == "__main__":
    main()
