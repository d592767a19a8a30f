"""The CAP train state, the compiled train step and the feature passes around it.

The step is a pure function of (state, frozen inputs, batch, margin). It computes the prompted
text features once, runs the weak unlabeled view through the image tower without building a
backward pass, and differentiates only the trainable tree (prompts and adapters). Under
`jax.pmap` every device gets a slice of each stream; the losses are written so that the
gradient summed over devices equals the gradient of the global batch, which makes the result
independent of the device count.

The towers are passed in as an object with `text_features(frozen, prompts)` and
`image_features(frozen, prompts, images)`, so the same step trains MaPLe CLIP
(`ClipTowers`) and the feature-level simulation used by the controlled benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cap_jax import adapters as adapters_lib
from cap_jax import losses

AXIS_NAME = "batch"

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Trainable parameters, optimizer state and the global step count."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree


def create_train_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_optimizer(*, learning_rate: float, momentum: float, weight_decay: float,
                   warmup_steps: int, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, as `torch.optim.SGD` applies it.

    torch adds `weight_decay * p` to the gradient before the momentum buffer, so the decay goes
    first in the chain. The learning rate warms up linearly from 0 and decays to 0 on a cosine.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=0.0)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum),
    )


@dataclasses.dataclass(frozen=True)
class ClipTowers:
    """MaPLe-prompted CLIP towers; `frozen` is {'clip': params, 'prompt_inputs': PromptInputs}."""

    module: Any

    def text_features(self, frozen: PyTree, prompts: PyTree) -> jax.Array:
        from cap_jax import prompts as prompts_lib

        return prompts_lib.prompted_text_features(
            self.module, frozen["clip"], prompts, frozen["prompt_inputs"])

    def image_features(self, frozen: PyTree, prompts: PyTree, images: jax.Array) -> jax.Array:
        from cap_jax import prompts as prompts_lib

        return prompts_lib.prompted_image_features(self.module, frozen["clip"], prompts, images)


def unit(x: jax.Array) -> jax.Array:
    """L2-normalise along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def cosine_logits(image_features: jax.Array, text_unit: jax.Array,
                  logit_scale: jax.Array) -> jax.Array:
    # [B, D] @ [D, C] -> [B, C]
    return logit_scale * unit(image_features) @ text_unit.T


def _adapter(params: PyTree, name: str, shared: bool) -> PyTree:
    """The image-side adapter of a branch; with `shared` the pseudo branch reuses the main one."""
    if shared and name == "pseudo":
        name = "visual"
    return params["adapters"][name]


def train_step(state: TrainState, frozen: PyTree, batch: dict[str, jax.Array], margin: jax.Array,
               *, towers: Any, tx: optax.GradientTransformation, threshold: float,
               adapter_ratio: float = 0.01, shared_adapter: bool = False,
               axis_name: Optional[str] = AXIS_NAME) -> tuple[TrainState, dict[str, jax.Array]]:
    """One CAP iteration on a batch of each stream.

    Args:
      state: the train state (donated by the compiled step).
      frozen: inputs that do not train: CLIP parameters, prompt inputs, `logit_scale`.
      batch: `main_images` [B, ...] with `main_labels` [B] (pseudolabels from the main-sample
        leaderboard); `weak_images` and `strong_images` [B, ...], the clean and strongly
        augmented views of the same unlabeled images; optionally `labeled_images` with
        `labeled_labels`. Each stream may carry a float mask `<stream>_valid` [B].
      margin: [C, C] float32 confusion-aware margin; row y is added to the logits of samples of
        label y (diagonal excluded).
      towers: object with `text_features(frozen, prompts)` and
        `image_features(frozen, prompts, images)`.
      tx: the optimizer.
      threshold: confidence above which an unlabeled pseudolabel is kept.
      adapter_ratio: residual weight of the adapters.
      shared_adapter: use the main image adapter for the strong view too (an ablation).
      axis_name: the pmap axis, or None for a single device without collectives.

    Returns:
      The new state and metrics: global `loss`, `main_loss`, `labeled_loss`,
      `unlabeled_loss`, `kept_fraction`, `counts` [C] (confident pseudolabels per class,
      summed over devices), `logits_finite`, and the local per-sample `pseudolabels`,
      `confidences` and `kept` of the unlabeled stream.
    """
    logit_scale = frozen["logit_scale"]
    has_labeled = "labeled_images" in batch

    def global_sum(x):
        return jax.lax.psum(x, axis_name) if axis_name else x

    def valid_mask(stream):
        key = f"{stream}_valid"
        if key in batch:
            return batch[key].astype(jnp.float32)
        return jnp.ones(batch[f"{stream}_images"].shape[0], jnp.float32)

    main_valid = valid_mask("main")
    weak_valid = valid_mask("weak")
    labeled_valid = valid_mask("labeled") if has_labeled else None
    # Each loss is a mean over the global batch: a device divides its local sum by global counts.
    main_total = jnp.maximum(global_sum(main_valid.sum()), 1.0)
    labeled_total = jnp.maximum(global_sum(labeled_valid.sum()), 1.0) if has_labeled else None

    # The weak view only gives pseudolabel targets, so it runs forward only, outside the grad.
    prompts_now = jax.lax.stop_gradient(state.params["prompts"])
    weak_features = towers.image_features(frozen, prompts_now, batch["weak_images"])

    def loss_fn(params):
        text_features = towers.text_features(frozen, params["prompts"])
        text_unit = unit(adapters_lib.apply_adapter(
            params["adapters"]["text"], text_features, ratio=adapter_ratio))

        streams = [batch["main_images"]]
        if has_labeled:
            streams.append(batch["labeled_images"])
        streams.append(batch["strong_images"])
        # One tower call per stream rather than one over the concatenated batch. The FLOPs are
        # equal, but on the CPU the backward pass of a 96-image batch ran at less than half the
        # FLOP rate of a 32-image one (measured with experiments/bench_step.py).
        pieces = [towers.image_features(frozen, params["prompts"], images) for images in streams]

        def branch_logits(feats, name):
            adapted = adapters_lib.apply_adapter(
                _adapter(params, name, shared_adapter), feats, ratio=adapter_ratio)
            return cosine_logits(adapted, text_unit, logit_scale)

        main_logits = branch_logits(pieces[0], "visual")
        strong_logits = branch_logits(pieces[-1], "pseudo")
        weak_logits = jax.lax.stop_gradient(branch_logits(weak_features, "visual"))

        main_loss = losses.margin_cross_entropy(
            main_logits, batch["main_labels"], margin, where=main_valid)
        main_share = main_loss * main_valid.sum() / main_total

        unlabeled_loss, aux = losses.self_training_loss(
            strong_logits, weak_logits, margin, threshold=threshold, where=weak_valid)
        kept_local = aux["kept"].sum()
        kept_total = jnp.maximum(global_sum(jax.lax.stop_gradient(kept_local)), 1.0)
        unlabeled_share = unlabeled_loss * kept_local / kept_total

        finite = jnp.isfinite(main_logits).all() & jnp.isfinite(strong_logits).all()
        shares = {"main_loss": main_share, "unlabeled_loss": unlabeled_share}
        if has_labeled:
            labeled_logits = branch_logits(pieces[1], "visual")
            labeled_loss = losses.margin_cross_entropy(
                labeled_logits, batch["labeled_labels"], margin, where=labeled_valid)
            shares["labeled_loss"] = labeled_loss * labeled_valid.sum() / labeled_total
            finite = finite & jnp.isfinite(labeled_logits).all()
        total = sum(shares.values())
        return total, (shares, aux, finite)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss_share, (shares, aux, finite)), grads = grad_fn(state.params)

    # Every device's loss is its share of the global mean, so the sum over the pmap axis of the
    # per-device gradients is the gradient of the global loss.
    grads = global_sum(grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    num_classes = margin.shape[0]
    kept = aux["kept"]
    counts = jnp.zeros(num_classes, jnp.int32).at[aux["pseudolabels"]].add(
        kept.astype(jnp.int32))
    weak_total = jnp.maximum(global_sum(weak_valid.sum()), 1.0)
    metrics = {
        "loss": global_sum(loss_share),
        "main_loss": global_sum(shares["main_loss"]),
        "unlabeled_loss": global_sum(shares["unlabeled_loss"]),
        "labeled_loss": global_sum(shares.get("labeled_loss", jnp.zeros(()))),
        "kept_fraction": global_sum(kept.sum()) / weak_total,
        "counts": global_sum(counts),
        "logits_finite": global_sum(finite.astype(jnp.int32)) == (
            global_sum(jnp.ones((), jnp.int32))),
        "pseudolabels": aux["pseudolabels"],
        "confidences": aux["confidences"],
        "kept": kept,
    }
    return new_state, metrics


def image_features_step(frozen: PyTree, params: PyTree, images: jax.Array, *, towers: Any,
                        adapter: Optional[str] = None, adapter_ratio: float = 0.01,
                        shared_adapter: bool = False) -> jax.Array:
    """Unit image features of the prompted tower, through one adapter branch or none."""
    features = towers.image_features(frozen, params["prompts"], images)
    if adapter is not None:
        features = adapters_lib.apply_adapter(
            _adapter(params, adapter, shared_adapter), features, ratio=adapter_ratio)
    return unit(features)


def text_features_step(frozen: PyTree, params: PyTree, *, towers: Any,
                       use_adapter: bool = False, adapter_ratio: float = 0.01) -> jax.Array:
    """Unit class text features of the prompted tower, optionally through the text adapter."""
    features = towers.text_features(frozen, params["prompts"])
    if use_adapter:
        features = adapters_lib.apply_adapter(
            params["adapters"]["text"], features, ratio=adapter_ratio)
    return unit(features)


# ----------------------------------------------------------------------------------------------
# Device placement.


def replicate(tree: PyTree, devices: Optional[list] = None) -> PyTree:
    """Copy a host pytree onto every device, stacked on a leading device axis.

    The arrays get the sharding that `jax.pmap` gives its outputs (a mesh over the `batch`
    axis), so a state fed back into the step does not trigger a second compilation.
    """
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS_NAME,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """Return the first device's copy of a replicated pytree, as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def shard(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """Split the leading axis of every array into [num_devices, per_device, ...]."""

    def split(x):
        if x.shape[0] % num_devices:
            raise ValueError(
                f"batch of {x.shape[0]} does not divide over {num_devices} devices")
        return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

    return {key: split(value) for key, value in batch.items()}


@dataclasses.dataclass
class CompiledSteps:
    """The pmapped train step and feature passes of one run, compiled once each."""

    train: Callable
    image_features: Callable
    text_features: Callable
    num_devices: int


def compile_steps(*, towers: Any, tx: optax.GradientTransformation, threshold: float,
                  adapter_ratio: float, shared_adapter: bool,
                  devices: Optional[list] = None) -> CompiledSteps:
    """Bind the run's settings into the step functions and wrap them in `jax.pmap`.

    The train state (argument 0) is donated: its buffers are reused for the new state.
    """
    devices = devices or jax.local_devices()
    step = functools.partial(
        train_step, towers=towers, tx=tx, threshold=threshold, adapter_ratio=adapter_ratio,
        shared_adapter=shared_adapter, axis_name=AXIS_NAME)
    train = jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,), devices=devices)

    def image_fn(frozen, params, images, adapter):
        return image_features_step(frozen, params, images, towers=towers, adapter=adapter,
                                   adapter_ratio=adapter_ratio, shared_adapter=shared_adapter)

    image_features = jax.pmap(image_fn, axis_name=AXIS_NAME, static_broadcasted_argnums=(3,),
                              devices=devices)
    def text_fn(frozen, params, use_adapter):
        return text_features_step(frozen, params, towers=towers, use_adapter=use_adapter,
                                  adapter_ratio=adapter_ratio)

    text_features = jax.pmap(text_fn, axis_name=AXIS_NAME, static_broadcasted_argnums=(2,),
                             devices=devices)
    return CompiledSteps(train=train, image_features=image_features, text_features=text_features,
                         num_devices=len(devices))
