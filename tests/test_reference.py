"""Check the math modules against the cases computed by the PyTorch CAP code.

Every ``<name>.npz`` in ``tests/data/reference`` is checked, with its
``<name>.json`` beside it for scalars. A file's cases come from its keys: a key
``<case>/<array>`` belongs to case ``<case>``, and a file without such prefixes
is one case. Parameters of a case are the JSON's top-level scalars overridden by
``json["cases"][<case>]``. Shapes and class counts are read from the arrays, so
new cases in the same format are checked without changes here. A file with no
checker below fails, so that new reference files are not silently ignored.

Floats must match to 1e-5 absolute, indices exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cap_jax import adapters, losses, margin, pseudolabels, schedules

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
ATOL = 1e-5

# maple_forward.npz checks the CLIP towers and is tested in tests/test_maple_reference.py.
SKIPPED_FILES = {"maple_forward"}


def _load_params(stem: str) -> dict:
    path = REFERENCE_DIR / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _split_cases(npz_path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Group a file's arrays by case: ``{case: {array name: array}}``."""
    cases: dict[str, dict[str, np.ndarray]] = {}
    with np.load(npz_path) as data:
        for key in data.files:
            case, _, name = key.rpartition("/")
            cases.setdefault(case, {})[name] = data[key]
    return cases


def _case_params(document: dict, case: str) -> dict:
    params = {key: value for key, value in document.items() if key not in ("cases", "note")}
    params.update(document.get("cases", {}).get(case, {}))
    return params


def _collect() -> list:
    items = []
    for npz_path in sorted(REFERENCE_DIR.glob("*.npz")):
        stem = npz_path.stem
        if stem in SKIPPED_FILES:
            continue
        for case in sorted(_split_cases(npz_path)):
            items.append(pytest.param(stem, case, id=f"{stem}/{case}" if case else stem))
    return items


def _assert_close(actual, expected, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, atol=ATOL, rtol=0, err_msg=what
    )


def _assert_indices_equal(actual, expected, what: str) -> None:
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_array_equal(actual, expected, err_msg=what)


def check_initial_leaderboard(arrays: dict, params: dict) -> None:
    expected = arrays["leaderboard"]
    labeled = np.arange(int(params.get("num_labeled", 0)))
    board = pseudolabels.initial_leaderboard(arrays["probs"], int(params["k"]), labeled=labeled)
    _assert_indices_equal(board, expected, "leaderboard")


def check_epoch_leaderboard(arrays: dict, params: dict) -> None:
    expected = arrays["leaderboard"]
    board = pseudolabels.epoch_leaderboard(
        arrays["pseudolabel"],
        arrays["confidence"],
        arrays["image_index"],
        num_classes=expected.shape[0],
        exclude=arrays.get("main_samples", ()),
    )
    _assert_indices_equal(board, expected, "leaderboard")


def check_main_sample_growth(arrays: dict, params: dict) -> None:
    columns = params["columns"]
    rows = arrays["rows"]
    assert rows.ndim == 2 and rows.shape[1] == len(columns), (rows.shape, columns)
    assert len(rows) > 0
    for row in rows:
        values = dict(zip(columns, row))
        k = pseudolabels.main_sample_count(
            int(values["epoch"]),
            n_main_samples=int(values["n_main_samples"]),
            max_main_ratio=float(values["max_main_ratio"]),
            epochs=int(values["epochs"]),
            unlabeled_per_class=int(values["unlabeled_per_class"]),
        )
        assert k == int(values["k"]), f"row {values}: got k={k}"


def check_margin(arrays: dict, params: dict) -> None:
    prototypes = jax.jit(margin.class_prototypes)(
        arrays["image_features"], arrays["leaderboard"], arrays["text_features"]
    )
    compute = jax.jit(margin.confusion_aware_margin, static_argnames=("scale", "factor"))
    seen = arrays.get("seen")
    result = compute(
        arrays["text_features"],
        prototypes,
        arrays["counts"],
        scale=float(params["scale"]),
        seen=seen,
    )
    _assert_close(result, arrays["margin"], "margin")


def check_losses(arrays: dict, params: dict) -> None:
    checked = 0
    if "margin_ce" in arrays:
        loss = jax.jit(losses.margin_cross_entropy)(
            arrays["logits"], arrays["labels"], arrays["margin"]
        )
        _assert_close(loss, arrays["margin_ce"], "margin_ce")
        checked += 1

    self_training = jax.jit(losses.self_training_loss)
    if "self_training" in arrays:
        loss, aux = self_training(
            arrays["strong_logits"],
            arrays["weak_logits"],
            arrays["margin"],
            threshold=jnp.asarray(arrays["threshold"]),
        )
        _assert_close(loss, arrays["self_training"], "self_training")
        checked += 1
        if "kept" in arrays:
            _assert_indices_equal(aux["kept"], arrays["kept"].astype(np.float32), "kept")

    if "self_training_empty_mask" in arrays:
        # No probability is strictly above 1, so threshold 1 keeps nothing.
        loss, aux = self_training(
            arrays["strong_logits"], arrays["weak_logits"], arrays["margin"], threshold=1.0
        )
        assert float(jnp.sum(aux["kept"])) == 0.0
        _assert_close(loss, arrays["self_training_empty_mask"], "self_training_empty_mask")
        checked += 1
    assert checked > 0, f"no known output among {sorted(arrays)}"


def check_schedule(arrays: dict, params: dict) -> None:
    expected = arrays["lr_multiplier"]
    schedule = schedules.learning_rate_schedule(
        1.0, warmup_steps=int(params["warmup_steps"]), total_steps=int(params["total_steps"])
    )
    values = jax.jit(jax.vmap(schedule))(jnp.arange(expected.shape[0]))
    _assert_close(values, expected, "lr_multiplier")


def check_adapters(arrays: dict, params: dict) -> None:
    params_by_branch = adapters.adapters_from_state_dict(arrays)
    apply = jax.jit(adapters.apply_adapter)
    outputs = {
        "text_out": ("text", "text_in"),
        "image_out": ("visual", "image_in"),
        "image_pseudo_out": ("pseudo", "image_in"),
    }
    checked = 0
    for output, (branch, source) in outputs.items():
        if output in arrays:
            _assert_close(apply(params_by_branch[branch], arrays[source]), arrays[output], output)
            checked += 1
    assert checked > 0, f"no known output among {sorted(arrays)}"


CHECKERS = {
    "initial_leaderboard": check_initial_leaderboard,
    "epoch_leaderboard": check_epoch_leaderboard,
    "main_sample_growth": check_main_sample_growth,
    "margin": check_margin,
    "losses": check_losses,
    "schedule": check_schedule,
    "adapters": check_adapters,
}


@pytest.mark.parametrize("stem, case", _collect())
def test_reference_case(stem: str, case: str):
    assert stem in CHECKERS, f"{stem}.npz has no checker in {__file__}"
    document = _load_params(stem)
    if case and "cases" in document:
        assert case in document["cases"], f"{stem}.json has no entry for case {case!r}"
    arrays = _split_cases(REFERENCE_DIR / f"{stem}.npz")[case]
    CHECKERS[stem](arrays, _case_params(document, case))


def test_reference_files_found():
    stems = {path.stem for path in REFERENCE_DIR.glob("*.npz")} - SKIPPED_FILES
    assert stems, f"no reference files in {REFERENCE_DIR}"
    assert stems <= set(CHECKERS), f"files without a checker: {sorted(stems - set(CHECKERS))}"
