"""One CAP run from a config: data, zero-shot pass, leaderboard, training, results.

The run directory gets, in this order: `config.json`, `run.log`, `metrics.jsonl` (one JSON
line per epoch), `checkpoints/` (Orbax, one per epoch, the last two kept), `results.json`.
A directory that already contains checkpoints of the same run is resumed from the latest one.

Inputs are checked before any compute, each failure naming what to fix: the batch size against
the device count, the dataset (found, class names unique, labels in 0..C-1), every class prompt
and description against CLIP's context length, the unlabeled pool against the batch size, and
an existing checkpoint against this run's model, class list, paradigm and dataset.
NOTE: an unreadable image file is found when an image is first decoded, which is the
zero-shot pass (before training), unless `skip_bad_images` decodes and drops bad files at load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cap_jax import adapters as adapters_lib
from cap_jax import checkpoint as checkpoint_lib
from cap_jax import config as config_lib
from cap_jax import loop as loop_lib
from cap_jax import metrics as metrics_lib
from cap_jax import pseudolabels as pseudolabels_lib
from cap_jax import train as train_lib

log = logging.getLogger("cap_jax")

RANDOM_WEIGHTS_WARNING = (
    "the model has RANDOM weights: accuracies of this run measure nothing about CAP; pass "
    "pretrained CLIP weights with model=<local Hugging Face directory or hub id>")


# ----------------------------------------------------------------------------------------------
# Image sources.


class PoolSource:
    """Clean and strongly augmented views of one split, preprocessed for CLIP on the host."""

    def __init__(self, split: Any, image_size: int):
        self.split = split
        self.image_size = image_size

    def clean(self, ids: np.ndarray) -> np.ndarray:
        from cap_jax.data import transforms

        return transforms.clip_preprocess(self.split.load_images(ids), size=self.image_size)

    def strong(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from cap_jax.data import transforms

        return transforms.strong_augment(rng, self.split.load_images(ids), size=self.image_size)


# ----------------------------------------------------------------------------------------------
# Zero-shot pass.


def _fingerprint(values: dict[str, Any]) -> str:
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model: Any) -> dict[str, Any]:
    """Describe a model's weights for cache keys: the name, and for files their sizes and times."""
    info: dict[str, Any] = {"name": model.name, "random": bool(model.is_random)}
    path = getattr(model, "path", None)
    if path and os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            stat = os.stat(os.path.join(path, name))
            info[name] = [stat.st_size, int(stat.st_mtime)]
    return info


def _batched_pass(fn, source_fn, count: int, batch_size: int, num_devices: int,
                  desc: str, progress: bool) -> np.ndarray:
    """Apply a pmapped function to all `count` items in fixed-size batches, loading ahead."""
    from tqdm.auto import tqdm

    from cap_jax.data.loader import prefetch

    ids = np.arange(count)
    starts = list(range(0, count, batch_size))

    def host_batches():
        for start in starts:
            chunk = ids[start:start + batch_size]
            padded = np.concatenate([chunk, np.full(batch_size - chunk.size, chunk[0])])
            images = source_fn(padded)
            yield chunk.size, images.reshape(
                (num_devices, batch_size // num_devices) + images.shape[1:])

    outputs = []
    for size, images in tqdm(prefetch(host_batches(), size=2), total=len(starts), desc=desc,
                             disable=not progress, leave=False):
        outputs.append(np.asarray(fn(images)).reshape(batch_size, -1)[:size])
    return np.concatenate(outputs)


class ZeroShotEncoder:
    """The frozen image tower, pmapped and compiled once, with parameters on every device."""

    def __init__(self, model: Any):
        self.params_r = train_lib.replicate(model.params)
        module = model.module

        def encode(params, images):
            features = module.apply({"params": params}, images, method=module.encode_image)
            features = features.astype(jnp.float32)
            return features / jnp.linalg.norm(features, axis=-1, keepdims=True)

        self._encode = jax.pmap(encode, axis_name=train_lib.AXIS_NAME)

    def __call__(self, images: np.ndarray) -> jax.Array:
        """Unit image features of device-sharded images [devices, B, H, W, 3]."""
        return self._encode(self.params_r, images)


def zero_shot_pass(model: Any, split: Any, class_names: list[str], *, template: str,
                   batch_size: int, cache_path: Optional[str] = None,
                   progress: bool = True,
                   encoder: Optional[ZeroShotEncoder] = None) -> dict[str, np.ndarray]:
    """Score every image of `split` with frozen CLIP (no prompts) against "template(class)".

    Pass the same `encoder` to several calls so the image tower compiles once.

    Returns:
      {'probs': [N, C] float32 softmax of the cosine logits times CLIP's logit scale,
       'image_features': [N, D] unit, 'text_features': [C, D] unit}. Read from `cache_path`
       when it exists; written there otherwise.
    """
    if cache_path and os.path.isfile(cache_path):
        log.info("zero-shot pass: reading the cached result %s", cache_path)
        with np.load(cache_path) as cached:
            return {key: cached[key] for key in cached.files}
    num_devices = jax.local_device_count()
    batch_size = max(num_devices, batch_size - batch_size % num_devices)
    texts = [template.format(name) for name in class_names]
    text_features = np.array(model.encode_texts(texts), np.float32)
    text_features /= np.linalg.norm(text_features, axis=-1, keepdims=True)
    params = model.params
    encoder = encoder or ZeroShotEncoder(model)
    source = PoolSource(split, model.config.image_resolution)
    log.info("zero-shot pass over %d images (batch %d on %d devices)", len(split), batch_size,
             num_devices)
    started = time.time()
    image_features = _batched_pass(encoder, source.clean,
                                   len(split), batch_size, num_devices, "zero-shot", progress)
    seconds = time.time() - started
    log.info("zero-shot pass: %.1f images/s", len(split) / max(seconds, 1e-9))
    scale = float(np.exp(np.asarray(params["logit_scale"])))
    logits = scale * image_features @ text_features.T
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float32)
    result = {"probs": probs, "image_features": image_features.astype(np.float32),
              "text_features": text_features}
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        temporary = f"{cache_path}.{os.getpid()}.partial.npz"
        np.savez(temporary, **result)
        os.replace(temporary, cache_path)
    return result


# ----------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Paradigm:
    """The labeled images and the seen classes of a UL, SSL or TRZSL run."""

    labeled_ids: Optional[np.ndarray]
    seen: Optional[np.ndarray]

    @property
    def labeled(self) -> bool:
        return self.labeled_ids is not None


def setup_paradigm(config: config_lib.RunConfig, data: Any) -> Paradigm:
    num_classes = len(data.class_names)
    labels = data.train.labels
    if config.paradigm == "UL":
        return Paradigm(labeled_ids=None, seen=None)
    from cap_jax.data import protocol

    if config.paradigm == "SSL":
        ids = protocol.select_labeled(labels, per_class=config.labeled_per_class,
                                      seed=config.labeled_seed)
        return Paradigm(labeled_ids=np.asarray(ids, np.int64), seen=None)
    seen_names, _ = protocol.split_classes(list(data.class_names), config.split_seed)
    seen = np.isin(np.array(data.class_names), np.array(seen_names))
    ids = np.flatnonzero(seen[labels])
    return Paradigm(labeled_ids=ids.astype(np.int64), seen=seen)


def initial_leaderboard(config, zero_shot, paradigm: Paradigm, labels: np.ndarray) -> np.ndarray:
    """Zero-shot top-k main samples; TRZSL seen classes hold up to k of their labeled images."""
    probs = zero_shot["probs"]
    labeled = np.zeros(probs.shape[0], bool)
    if paradigm.labeled:
        labeled[paradigm.labeled_ids] = True
    if paradigm.seen is not None:
        # Unseen images are pseudolabeled among the unseen classes only.
        probs = np.where(paradigm.seen[None, :], 0.0, probs)
    board = np.asarray(pseudolabels_lib.initial_leaderboard(
        probs, config.n_main_samples, labeled=labeled), np.int64)
    if paradigm.seen is not None:
        for c in np.flatnonzero(paradigm.seen):
            members = paradigm.labeled_ids[labels[paradigm.labeled_ids] == c]
            row = np.full(board.shape[1], -1, np.int64)
            row[:min(members.size, row.size)] = members[:row.size]
            board[c] = row
    return board


def evaluate(steps: train_lib.CompiledSteps, frozen_r, params_r, source: PoolSource,
             labels: np.ndarray, *, batch_size: int, seen: Optional[np.ndarray],
             prefix: str = "test") -> dict[str, Any]:
    """Accuracy of the prompted model without adapters on a labeled split."""
    text = np.asarray(steps.text_features(frozen_r, params_r, False))[0]
    features = loop_lib.pooled_features(
        lambda images: steps.image_features(frozen_r, params_r, images, None),
        source.clean, np.arange(labels.size), batch_size=batch_size,
        num_devices=steps.num_devices)
    predictions = np.argmax(features @ text.T, axis=-1)  # [N, D] @ [D, C] -> [N, C]
    return accuracy_report(predictions, labels, len(text), seen=seen, prefix=prefix)


def accuracy_report(predictions, labels, num_classes, *, seen, prefix) -> dict[str, Any]:
    report = {
        f"{prefix}_accuracy": float(metrics_lib.accuracy(predictions, labels)),
        f"{prefix}_per_class_accuracy": [
            None if math.isnan(v) else float(v)
            for v in np.asarray(metrics_lib.per_class_accuracy(
                predictions, labels, num_classes=num_classes))],
    }
    if seen is not None:
        seen_mask = seen[labels]
        seen_acc = float(np.mean(predictions[seen_mask] == labels[seen_mask]))
        unseen_acc = float(np.mean(predictions[~seen_mask] == labels[~seen_mask]))
        report[f"{prefix}_seen_accuracy"] = seen_acc
        report[f"{prefix}_unseen_accuracy"] = unseen_acc
        report[f"{prefix}_harmonic_mean"] = float(metrics_lib.harmonic_mean(seen_acc, unseen_acc))
    return report


def json_safe(value):
    """Return `value` with NaN and infinity as None and numpy scalars as Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def _setup_logging(workdir: str) -> tuple[logging.Handler, int]:
    """Attach run.log to the cap_jax logger at INFO; return the handler and the old level."""
    handler = logging.FileHandler(os.path.join(workdir, "run.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cap_jax")
    level = logger.level
    # run.log gets the INFO lines even where the caller configured logging at WARNING.
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler, level


def _check_saved_config(config: config_lib.RunConfig, path: str) -> None:
    with open(path) as f:
        saved = json.load(f)
    current = config.to_dict()
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise ValueError(
            f"{path} contains a run with another config ({details}); resume it with the same "
            f"config, or use another --workdir")


def memory_usage() -> dict[str, float]:
    """Resident memory of this process now and at its peak, in GB (Linux)."""
    import resource

    usage = {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        usage["memory_gb"] = resident_pages * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return usage


def check_data(data: Any) -> None:
    """Check class names and labels of both splits before any compute.

    Raises:
      ValueError: on duplicate class names (compared in lower case with '_' read as ' '), an
        empty split, or labels outside 0..C-1, naming the split and the offending values.
    """
    from cap_jax.data import labels as labels_lib

    class_names = list(data.class_names)
    labels_lib.check_unique_names(class_names, source=f"the class names of {data.name}")
    num_classes = len(class_names)
    for split_name in ("train", "test"):
        labels = np.asarray(getattr(data, split_name).labels)
        if labels.size == 0:
            raise ValueError(f"the {split_name} split of {data.name} has no images")
        outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
        if outside.size:
            raise ValueError(
                f"the {split_name} labels of {data.name} must lie in 0..{num_classes - 1} for "
                f"{num_classes} classes; found {outside[:10].tolist()}")


def check_texts(model: Any, class_names: list[str], template: str,
                descriptions: Optional[dict[str, list[str]]] = None) -> None:
    """Tokenize every class prompt and description once, before any compute.

    Raises:
      ValueError: naming the class, the text and its token count, when a text is longer than
        CLIP's context (77 tokens with the start and end tokens).
    """
    texts = [("prompt", name, template.format(name)) for name in class_names]
    for name, entries in (descriptions or {}).items():
        texts.extend(("description", name, text) for text in entries)
    for kind, name, text in texts:
        try:
            model.tokenize([text])
        except ValueError as error:
            raise ValueError(f"the {kind} of class {name!r} is too long: {error}") from error


def _has_checkpoint(checkpoint_dir: str) -> bool:
    return os.path.isdir(checkpoint_dir) and any(
        name.isdigit() for name in os.listdir(checkpoint_dir))


def _load_data(config: config_lib.RunConfig) -> Any:
    from cap_jax.data import sources

    try:
        return sources.load_dataset(
            config.dataset, root=config.data_root, train_subset=config.train_subset,
            test_subset=config.test_subset, subset_seed=config.seed,
            skip_bad_images=config.skip_bad_images, label_offset=config.label_offset,
            train_split=config.train_split)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error} On the command line, set the data folder with --set data_root=DIR "
            f"(now {config.data_root!r}); experiments/SETTINGS.md says where each benchmark "
            f"comes from and how to prepare it.") from error


def default_cache_dir() -> str:
    return os.environ.get("CAP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                        "cap_jax"))


def run(config: config_lib.RunConfig, workdir: str, *, progress: bool = True,
        data: Any = None, model: Any = None) -> dict[str, Any]:
    """Run CAP with `config`, writing everything into `workdir`, and return the results.

    `data` and `model` may be passed in (tests); otherwise they are loaded from the config.
    """
    from cap_jax.data.dataset import ImageReadError

    os.makedirs(workdir, exist_ok=True)
    handler, level = _setup_logging(workdir)
    try:
        return _run(config, workdir, progress=progress, data=data, model=model)
    except ImageReadError as error:
        failure = ImageReadError(
            error.source, f"{error.reason}. Replace or delete the file, or set "
            "skip_bad_images=true in the config to leave unreadable images out")
        _record_failure(handler, failure)
        raise failure from error
    except Exception as error:
        _record_failure(handler, error)
        raise
    finally:
        logging.getLogger("cap_jax").removeHandler(handler)
        logging.getLogger("cap_jax").setLevel(level)
        handler.close()


def _record_failure(handler: logging.Handler, error: BaseException) -> None:
    """Write the error that stops a run into run.log only; the caller reports it as it likes."""
    handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run stopped: %s: %s",
                                  (type(error).__name__, error), None))


def _run(config, workdir, *, progress, data, model):
    config_path = os.path.join(workdir, "config.json")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if os.path.isfile(config_path) and _has_checkpoint(checkpoint_dir):
        _check_saved_config(config, config_path)
    config_lib.save_config(config, config_path)
    log.info("config: %s", json.dumps(config.to_dict(), sort_keys=True))

    num_devices = jax.local_device_count()
    if config.batch_size % num_devices:
        raise ValueError(
            f"batch_size {config.batch_size} does not divide over the {num_devices} local "
            f"devices; choose a multiple of {num_devices}")
    log.info("%d local devices (%s)", num_devices, jax.local_devices()[0].platform)
    eval_batch = max(num_devices, config.eval_batch_size - config.eval_batch_size % num_devices)

    if data is None:
        data = _load_data(config)
    check_data(data)
    class_names = list(data.class_names)
    num_classes = len(class_names)
    log.info("data: %s, %d classes, %d training images (unlabeled pool), %d test images",
             data.name, num_classes, len(data.train), len(data.test))

    if model is None:
        from cap_jax import clip

        model = clip.load(config.model, dtype=jnp.dtype(config.dtype))
    if model.is_random:
        log.warning(RANDOM_WEIGHTS_WARNING)
    descriptions = None
    if config.concept_alignment != "off":
        from cap_jax.alignment import SHIPPED_DESCRIPTIONS
        from cap_jax.data.descriptions import load_descriptions

        source = config.descriptions or SHIPPED_DESCRIPTIONS.get(data.name.lower())
        descriptions = load_descriptions(source) if source else None
    check_texts(model, class_names, config.template, descriptions)
    from cap_jax import prompts as prompts_lib

    prompt_inputs = prompts_lib.class_prompt_inputs(model, class_names, n_ctx=config.n_ctx,
                                                    template=config.template)

    paradigm = setup_paradigm(config, data)
    unlabeled_ids = np.arange(len(data.train))
    if paradigm.labeled:
        unlabeled_ids = np.setdiff1d(unlabeled_ids, paradigm.labeled_ids)
        log.info("%s: %d labeled images, %d unlabeled", config.paradigm,
                 paradigm.labeled_ids.size, unlabeled_ids.size)
    if unlabeled_ids.size < config.batch_size:
        raise ValueError(
            f"the unlabeled pool has {unlabeled_ids.size} images, fewer than batch_size "
            f"{config.batch_size}; lower batch_size or use more training images")

    identity = {"model": model.name, "class_names": class_names, "paradigm": config.paradigm,
                "dataset": data.name}
    checkpointer = checkpoint_lib.RunCheckpointer(checkpoint_dir, identity)
    try:
        checkpointer.check_identity()
        return _train(config, workdir, progress=progress, data=data, model=model,
                      paradigm=paradigm, prompt_inputs=prompt_inputs, checkpointer=checkpointer,
                      unlabeled_ids=unlabeled_ids, eval_batch=eval_batch)
    finally:
        checkpointer.close()


def _train(config, workdir, *, progress, data, model, paradigm, prompt_inputs, checkpointer,
           unlabeled_ids, eval_batch):
    """Zero-shot pass, initial leaderboard, training and results, after the input checks."""
    class_names = list(data.class_names)
    num_classes = len(class_names)
    image_size = model.config.image_resolution
    train_labels = np.asarray(data.train.labels)

    # Zero-shot pass over the training pool and the test split, cached by what they depend on.
    cache_dir = config.cache_dir or default_cache_dir()
    key_base = {"model": model_fingerprint(model), "dataset": data.name,
                "root": config.data_root, "template": config.template, "classes": class_names,
                "dtype": config.dtype, "seed": config.seed}
    zero_shot = {}
    encoder = None
    for split_name, split, subset in (("train", data.train, config.train_subset),
                                      ("test", data.test, config.test_subset)):
        key = _fingerprint(dict(key_base, split=split_name, subset=subset, size=len(split)))
        cache_path = os.path.join(cache_dir, "zero_shot", f"{data.name}-{split_name}-{key}.npz")
        if encoder is None and not os.path.isfile(cache_path):
            encoder = ZeroShotEncoder(model)
        zero_shot[split_name] = zero_shot_pass(
            model, split, class_names, template=config.template,
            batch_size=config.zero_shot_batch_size, cache_path=cache_path, progress=progress,
            encoder=encoder)
    del encoder
    zero_shot_predictions = np.argmax(zero_shot["test"]["probs"], axis=-1)
    zero_shot_report = accuracy_report(zero_shot_predictions, np.asarray(data.test.labels),
                                       num_classes, seen=paradigm.seen, prefix="zero_shot")
    log.info("zero-shot test accuracy: %.4f", zero_shot_report["zero_shot_accuracy"])

    board = initial_leaderboard(config, zero_shot["train"], paradigm, train_labels)
    concepts_report = None
    if config.concept_alignment != "off":
        from cap_jax import alignment

        board, concepts_report = alignment.align_leaderboard(
            config, model, zero_shot["train"], board, class_names, paradigm, workdir,
            dataset_name=data.name)
    with open(os.path.join(workdir, "initial_leaderboard.json"), "w") as f:
        json.dump({name: [int(i) for i in row if i >= 0] for name, row in zip(class_names, board)},
                  f, indent=1)
    log.info("initial leaderboard: %d main samples, %.3f of them correct",
             int((board >= 0).sum()),
             float(np.mean(train_labels[board[board >= 0]] ==
                           np.nonzero(board >= 0)[0])) if (board >= 0).any() else float("nan"))

    # Parameters, optimizer, compiled steps.
    from cap_jax import prompts as prompts_lib

    rng = jax.random.key(config.seed)
    prompt_rng, adapter_rng = jax.random.split(rng)
    prompt_params = prompts_lib.init_prompt_params(
        prompt_rng, model, n_ctx=config.n_ctx, depth=config.prompt_depth)
    dim = model.config.embed_dim
    adapter_params = adapters_lib.init_adapters(
        adapter_rng, dim, hidden=config.adapter_hidden or max(1, dim // 4))
    params = {"prompts": prompt_params, "adapters": adapter_params}
    total_steps = config.epochs * config.iterations_per_epoch
    tx = train_lib.make_optimizer(
        learning_rate=config.learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_epochs * config.iterations_per_epoch, total_steps=total_steps)
    state = train_lib.create_train_state(params, tx)
    loop_state = loop_lib.LoopState(epoch=0, leaderboard=board,
                                    counts=np.zeros(num_classes, np.int64))

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if checkpointer.latest_epoch() is not None:
        state, loop_state = checkpointer.restore(state)
        log.info("resuming from the checkpoint after epoch %d", loop_state.epoch - 1)
        _truncate_metrics(metrics_path, loop_state.epoch)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    frozen = {"clip": model.params, "prompt_inputs": prompt_inputs,
              "logit_scale": jnp.exp(jnp.asarray(model.params["logit_scale"], jnp.float32))}
    towers = train_lib.ClipTowers(model.module)
    steps = train_lib.compile_steps(towers=towers, tx=tx, threshold=config.threshold,
                                    adapter_ratio=config.adapter_ratio,
                                    shared_adapter=config.shared_adapter)
    frozen_r = train_lib.replicate(frozen)
    state_r = train_lib.replicate(state)

    train_source = PoolSource(data.train, image_size)
    test_source = PoolSource(data.test, image_size)
    streams = loop_lib.Streams(
        unlabeled_ids=unlabeled_ids, labeled_ids=paradigm.labeled_ids,
        labeled_labels=train_labels[paradigm.labeled_ids] if paradigm.labeled else None,
        seen=paradigm.seen, pool_labels=train_labels)
    settings = loop_lib.LoopSettings(
        epochs=config.epochs, iterations_per_epoch=config.iterations_per_epoch,
        batch_size=config.batch_size, seed=config.seed, n_main_samples=config.n_main_samples,
        max_main_ratio=config.max_main_ratio, update_every=config.update_every,
        margin_scale=config.margin_scale, use_margin=config.use_margin,
        eval_every=config.eval_every, feature_batch_size=eval_batch)
    schedule = lambda step: config.learning_rate * float(  # noqa: E731
        tx_schedule_value(step, config.iterations_per_epoch * config.warmup_epochs, total_steps))

    def evaluate_fn(params_r):
        return evaluate(steps, frozen_r, params_r, test_source, np.asarray(data.test.labels),
                        batch_size=eval_batch, seen=paradigm.seen)

    last_evaluation: dict[str, Any] = {}

    def on_epoch_end(state_r, next_loop_state, record):
        record = json_safe(dict(record, **memory_usage()))
        if "test_accuracy" in record:
            last_evaluation.clear()
            last_evaluation.update(
                {k: v for k, v in record.items() if k.startswith("test_")}, epoch=record["epoch"])
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        checkpointer.save(train_lib.unreplicate(state_r), next_loop_state)
        summary = {k: record[k] for k in ("loss", "kept_fraction", "pseudolabel_accuracy",
                                          "test_accuracy", "seconds") if k in record}
        log.info("epoch %d: %s", record["epoch"], json.dumps(summary))

    from cap_jax.data.loader import prefetch

    if loop_state.epoch >= config.epochs:
        log.info("all %d epochs are done; evaluating the final checkpoint", config.epochs)
    else:
        log.info("compiling the train step (the first iteration is slow)")
    started = time.time()
    try:
        state_r, loop_state = loop_lib.run_epochs(
            steps=steps, state_r=state_r, frozen_r=frozen_r, source=train_source,
            streams=streams, loop_state=loop_state, settings=settings, learning_rate=schedule,
            evaluate=evaluate_fn, on_epoch_end=on_epoch_end,
            prefetch=lambda it: prefetch(it, size=2), progress=progress)
    except loop_lib.NonFiniteLossError as error:
        latest = checkpointer.latest_epoch()
        if latest is None:
            kept = "no checkpoint was written before it"
        else:
            kept = (f"the last good checkpoint is "
                    f"{os.path.join(checkpointer.directory, str(latest))}, written after epoch "
                    f"{latest - 1}")
        raise loop_lib.NonFiniteLossError(f"{error}; {kept}") from error

    if last_evaluation.get("epoch") == config.epochs - 1:
        final = {k: v for k, v in last_evaluation.items() if k != "epoch"}
    else:
        final = evaluate_fn(state_r.params)
    results = {
        "name": config.name, "paradigm": config.paradigm, "dataset": data.name,
        "model": model.name, "random_weights": bool(model.is_random), "seed": config.seed,
        "num_classes": num_classes, "class_names": class_names,
        "train_images": len(data.train), "test_images": len(data.test),
        "epochs": config.epochs, "training_seconds": time.time() - started,
        "main_samples": int((loop_state.leaderboard >= 0).sum()),
        **final, **zero_shot_report,
    }
    if model.is_random:
        results["warning"] = RANDOM_WEIGHTS_WARNING
    if concepts_report is not None:
        results["concept_alignment"] = concepts_report.get("summary", concepts_report)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(json_safe(results), f, indent=2)
        f.write("\n")
    log.info("results: test accuracy %.4f (zero-shot %.4f)", results["test_accuracy"],
             results["zero_shot_accuracy"])
    return results


def tx_schedule_value(step: int, warmup_steps: int, total_steps: int) -> float:
    from cap_jax import schedules

    return float(schedules.learning_rate_schedule(
        1.0, warmup_steps=warmup_steps, total_steps=total_steps)(step))


def _truncate_metrics(path: str, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint, left by a run killed mid-epoch."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) < epochs_done]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
