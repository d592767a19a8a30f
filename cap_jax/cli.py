"""The `cap-jax` command.

  cap-jax run --config CONFIG --workdir DIR [--set key=value ...]
  cap-jax configs
  cap-jax table RUN_DIR [RUN_DIR ...] [--output PREFIX]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _run(args: argparse.Namespace) -> int:
    from cap_jax import config as config_lib
    from cap_jax import run as run_lib
    from cap_jax.loop import NonFiniteLossError

    config = config_lib.load_config(args.config, args.set)
    try:
        results = run_lib.run(config, args.workdir, progress=not args.no_progress)
    except NonFiniteLossError as error:
        logging.getLogger("cap_jax").error("%s", error)
        return 3
    print(f"test accuracy {results['test_accuracy']:.4f} (zero-shot "
          f"{results['zero_shot_accuracy']:.4f}); results in "
          f"{os.path.join(args.workdir, 'results.json')}")
    return 0


def _configs(args: argparse.Namespace) -> int:
    from cap_jax import config as config_lib

    folder = config_lib.config_dir()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            print(name[:-5])
    return 0


def _table(args: argparse.Namespace) -> int:
    from cap_jax import report

    markdown, csv_text = report.gather(args.run_dirs)
    if args.output:
        with open(args.output + ".md", "w") as f:
            f.write(markdown)
        with open(args.output + ".csv", "w") as f:
            f.write(csv_text)
    print(markdown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cap-jax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run CAP training and evaluation from a config")
    run.add_argument("--config", required=True,
                     help="a JSON config file, or the name of a config in experiments/configs")
    run.add_argument("--workdir", required=True,
                     help="run directory for config, logs, metrics, checkpoints and results; "
                          "a directory with checkpoints of the same run is resumed")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value (repeatable), e.g. --set epochs=3")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.set_defaults(handler=_run)

    configs = commands.add_parser("configs", help="list the shipped configs")
    configs.set_defaults(handler=_configs)

    table = commands.add_parser("table", help="gather run results into one table")
    table.add_argument("run_dirs", nargs="+", help="run directories (each with results.json)")
    table.add_argument("--output", help="write PREFIX.md and PREFIX.csv")
    table.set_defaults(handler=_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    # Orbax logs about a dozen INFO lines per checkpoint through absl.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # JAX reports each accelerator backend it cannot find (no TPU library, no GPU) at INFO.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:
        # Bad input (config, data, image files, checkpoints): the message states what to fix.
        logging.getLogger("cap_jax").error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
