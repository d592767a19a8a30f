"""Time the compiled CAP train step or the zero-shot pass; print one JSON line.

Examples:
  python experiments/bench_step.py --classes 10 --batch 32 --paradigm SSL
  python experiments/bench_step.py --pass zero_shot --batch 64
  python experiments/bench_step.py --pass matmul

The step is timed after compilation: the median of `--iterations` timed iterations. FLOPs come
from XLA's cost analysis of the compiled step on one device. `--pass matmul` measures a plain
large float32 matrix product, the machine's practical peak to compare the step against.
Timings on shared machines are noisy: compare numbers measured side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def peak_memory_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def cost_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def time_calls(fn, iterations: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    seconds = []
    for _ in range(iterations):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - started)
    return seconds


def bench_matmul(args) -> dict:
    n = args.matmul_size
    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    product = jax.jit(lambda x, y: x @ y)
    seconds = statistics.median(time_calls(lambda: product(a, b), args.iterations))
    flops = 2.0 * n ** 3
    return {"pass": "matmul", "size": n, "seconds": seconds, "gflops_per_second": flops / seconds
            / 1e9}


def _model(args):
    from cap_jax import clip

    return clip.load(args.model, dtype=jnp.dtype(args.dtype))


def bench_zero_shot(args) -> dict:
    """Images per second of the batched, compiled zero-shot image pass (host loading included)."""
    from cap_jax import run as run_lib
    from cap_jax.data.dataset import ImageDataset

    model = _model(args)
    count = args.batch * args.iterations
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    names = [f"class {i}" for i in range(args.classes)]
    split = ImageDataset(names, images, rng.integers(0, args.classes, count))
    # One untimed pass compiles; the timed pass runs the same shapes with the same encoder.
    encoder = run_lib.ZeroShotEncoder(model)
    run_lib.zero_shot_pass(model, split.subset(np.arange(args.batch)), names,
                           template="a photo of a {}.", batch_size=args.batch, progress=False,
                           encoder=encoder)
    started = time.perf_counter()
    run_lib.zero_shot_pass(model, split, names, template="a photo of a {}.",
                           batch_size=args.batch, progress=False, encoder=encoder)
    seconds = time.perf_counter() - started
    return {"pass": "zero_shot", "model": args.model, "dtype": args.dtype, "images": count,
            "batch": args.batch, "images_per_second": count / seconds,
            "peak_memory_gb": peak_memory_gb()}


def bench_train_step(args) -> dict:
    from cap_jax import adapters, prompts, train

    model = _model(args)
    config = model.config
    names = [f"class {i}" for i in range(args.classes)]
    prompt_params = prompts.init_prompt_params(jax.random.key(0), model, n_ctx=2,
                                               depth=min(args.depth, config.vision_layers))
    params = {"prompts": prompt_params,
              "adapters": adapters.init_adapters(jax.random.key(1), config.embed_dim,
                                                 hidden=config.embed_dim // 4)}
    tx = train.make_optimizer(learning_rate=0.01, momentum=0.9, weight_decay=0.1,
                              warmup_steps=50, total_steps=2500)
    state = train.create_train_state(params, tx)
    frozen = {"clip": model.params,
              "prompt_inputs": prompts.class_prompt_inputs(model, names, n_ctx=2),
              "logit_scale": jnp.asarray(100.0, jnp.float32)}
    size = config.image_resolution
    rng = np.random.default_rng(0)

    def images():
        return rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)

    batch = {"main_images": images(),
             "main_labels": rng.integers(0, args.classes, args.batch).astype(np.int32),
             "weak_images": images(), "strong_images": images()}
    if args.paradigm != "UL":
        batch["labeled_images"] = images()
        batch["labeled_labels"] = rng.integers(0, args.classes, args.batch).astype(np.int32)
    margin = np.zeros((args.classes, args.classes), np.float32)
    towers = train.ClipTowers(model.module)

    def step(state, frozen, batch, margin):
        return train.train_step(state, frozen, batch, margin, towers=towers, tx=tx,
                                threshold=0.85, axis_name=None)

    jitted = jax.jit(step, donate_argnums=(0,))
    started = time.perf_counter()
    compiled = jitted.lower(state, frozen, batch, margin).compile()
    compile_seconds = time.perf_counter() - started
    flops = cost_flops(compiled)

    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], frozen, batch, margin)
        return metrics["loss"]

    seconds = statistics.median(time_calls(call, args.iterations))
    streams = 4 if args.paradigm != "UL" else 3
    return {"pass": "train_step", "model": args.model, "dtype": args.dtype,
            "classes": args.classes, "batch_per_stream": args.batch, "paradigm": args.paradigm,
            "seconds_per_iteration": seconds,
            "images_per_second": streams * args.batch / seconds,
            "compile_seconds": compile_seconds, "gflop_per_iteration": flops / 1e9,
            "gflops_per_second": flops / seconds / 1e9, "peak_memory_gb": peak_memory_gb(),
            "devices": 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pass", dest="which", default="train_step",
                        choices=["train_step", "zero_shot", "matmul"])
    parser.add_argument("--model", default="random:ViT-B/32")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="images per stream per iteration")
    parser.add_argument("--paradigm", default="SSL", choices=["UL", "SSL", "TRZSL"])
    parser.add_argument("--depth", type=int, default=8, help="MaPLe prompt depth")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=4096)
    args = parser.parse_args(argv)
    bench = {"train_step": bench_train_step, "zero_shot": bench_zero_shot,
             "matmul": bench_matmul}[args.which]
    result = bench(args)
    result["backend"] = jax.default_backend()
    result["device"] = str(jax.devices()[0].device_kind)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
