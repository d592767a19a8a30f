"""Exact resume of a killed run, restore onto another device count, atomic checkpoint writes.

The resume test runs `python -m cap_jax run` in subprocesses on a folder of generated images
with random tiny CLIP weights. One run goes through without interruption. Another is killed
with SIGKILL as soon as its checkpoint after epoch 0 (of 3) is complete, then resumed with the
same command on 4 fake devices. A copy of the killed run's directory is resumed on 2 devices.
The subprocesses share a JAX compilation cache, so only the first run on each device count
compiles.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from image_folders import COLOURS, write_image_folder

from cap_jax import checkpoint as checkpoint_lib
from cap_jax import loop as loop_lib

EPOCHS = 3
KILL_AFTER_EPOCHS = 1
# Keys of a metrics line that measure time or memory, not the computation.
VOLATILE_KEYS = {"seconds", "memory_gb", "peak_memory_gb"}


def cli_env(devices, jax_cache):
    env = dict(os.environ)
    env.update({
        # Optimization level 0 compiles about a third faster; every run here uses the same flags.
        "XLA_FLAGS": (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0"),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    return env


def start_run(config_path, workdir, log_path, *, devices, jax_cache):
    command = [sys.executable, "-m", "cap_jax", "run", "--config", str(config_path),
               "--workdir", str(workdir), "--no-progress"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=cli_env(devices, jax_cache))


def log_tail(log_path):
    with open(log_path) as f:
        return f.read()[-4000:]


def finish(process, log_path, timeout=300):
    code = process.wait(timeout=timeout)
    assert code == 0, f"run failed with exit code {code}:\n{log_tail(log_path)}"


def kill_after_checkpoint(process, checkpoint_dir, epochs, log_path, timeout=300):
    """SIGKILL `process` as soon as the checkpoint after `epochs` epochs is complete."""
    finished = os.path.join(checkpoint_dir, str(epochs))
    deadline = time.monotonic() + timeout
    while not os.path.isdir(finished):
        assert process.poll() is None, (
            f"the run ended before its checkpoint {finished}:\n{log_tail(log_path)}")
        assert time.monotonic() < deadline, f"no checkpoint {finished} after {timeout} s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE_KEYS} for r in records]


def read_json(workdir, name):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def flat_leaves(tree, prefix=""):
    """Return {path: array} of a nested dict/list tree as read_checkpoint returns it."""
    if tree is None:
        return {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree)}
    leaves = {}
    for key, value in items:
        leaves.update(flat_leaves(value, f"{prefix}/{key}"))
    return leaves


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the same config uninterrupted, killed and resumed, and resumed on 2 devices."""
    base = tmp_path_factory.mktemp("resume")
    write_image_folder(base / "images", train_per_class=6, test_per_class=2)
    config = dict(
        name="resume", dataset="squares", data_root=str(base / "images"),
        model="random:tiny", prompt_depth=2, epochs=EPOCHS, iterations_per_epoch=2,
        batch_size=4, eval_every=2, eval_batch_size=8, zero_shot_batch_size=8,
        n_main_samples=2, update_every=1, threshold=0.0, cache_dir=str(base / "cache"))
    config_path = base / "config.json"
    config_path.write_text(json.dumps(config))
    jax_cache = base / "jax_cache"
    dirs = {name: base / name for name in ("whole", "killed", "two_devices")}
    logs = {name: base / f"{name}.log" for name in dirs}

    # The whole run fills the compilation cache before the run to kill starts.
    whole = start_run(config_path, dirs["whole"], logs["whole"], devices=4, jax_cache=jax_cache)
    finish(whole, logs["whole"])
    killed = start_run(config_path, dirs["killed"], logs["killed"], devices=4,
                       jax_cache=jax_cache)
    kill_after_checkpoint(killed, dirs["killed"] / "checkpoints", KILL_AFTER_EPOCHS,
                          logs["killed"])
    killed_state = {
        "checkpoints": sorted(os.listdir(dirs["killed"] / "checkpoints")),
        "results": (dirs["killed"] / "results.json").exists(),
    }
    shutil.copytree(dirs["killed"], dirs["two_devices"])
    # The 2-device resume compiles anew; the 4-device resume runs beside it.
    moved = start_run(config_path, dirs["two_devices"], logs["two_devices"], devices=2,
                      jax_cache=jax_cache)
    resumed = start_run(config_path, dirs["killed"], logs["killed"], devices=4,
                        jax_cache=jax_cache)
    finish(moved, logs["two_devices"])
    finish(resumed, logs["killed"])
    return {"dirs": dirs, "killed_state": killed_state}


def test_kill_happened_mid_run(runs):
    state = runs["killed_state"]
    assert str(KILL_AFTER_EPOCHS) in state["checkpoints"]
    assert str(EPOCHS) not in state["checkpoints"]
    assert not state["results"]


def test_resumed_run_logs_resume(runs):
    log = (runs["dirs"]["killed"] / "run.log").read_text()
    assert f"resuming from the checkpoint after epoch {KILL_AFTER_EPOCHS - 1}" in log


def test_resume_gives_same_parameters(runs):
    whole = checkpoint_lib.read_checkpoint(str(runs["dirs"]["whole"] / "checkpoints"))
    resumed = checkpoint_lib.read_checkpoint(str(runs["dirs"]["killed"] / "checkpoints"))
    assert whole["epoch"] == resumed["epoch"] == EPOCHS
    whole_leaves = flat_leaves(whole["state"])
    resumed_leaves = flat_leaves(resumed["state"])
    assert whole_leaves.keys() == resumed_leaves.keys()
    assert "/params/prompts/ctx" in whole_leaves
    for path, value in whole_leaves.items():
        assert value.dtype == resumed_leaves[path].dtype, path
        np.testing.assert_array_equal(resumed_leaves[path], value, err_msg=path)


def test_resume_gives_same_leaderboard_and_counts(runs):
    whole = checkpoint_lib.read_checkpoint(str(runs["dirs"]["whole"] / "checkpoints"))
    resumed = checkpoint_lib.read_checkpoint(str(runs["dirs"]["killed"] / "checkpoints"))
    np.testing.assert_array_equal(resumed["loop"]["leaderboard"], whole["loop"]["leaderboard"])
    np.testing.assert_array_equal(resumed["loop"]["counts"], whole["loop"]["counts"])
    # The leaderboard grew from the confident pseudolabels, so the comparison covers updates.
    assert (whole["loop"]["leaderboard"] >= 0).sum() > 2 * len(COLOURS)


def test_resume_gives_same_metrics(runs):
    whole = read_metrics(runs["dirs"]["whole"])
    resumed = read_metrics(runs["dirs"]["killed"])
    assert [r["epoch"] for r in whole] == list(range(EPOCHS))
    assert [r["epoch"] for r in resumed] == list(range(EPOCHS))
    for whole_record, resumed_record in zip(whole, resumed):
        assert resumed_record == whole_record
    # The margin is on from epoch 1, so the resumed epochs recomputed it from the checkpoint.
    assert whole[KILL_AFTER_EPOCHS]["margin_max"] > 0


def test_resume_gives_same_results(runs):
    whole = read_json(runs["dirs"]["whole"], "results.json")
    resumed = read_json(runs["dirs"]["killed"], "results.json")
    for key in ("test_accuracy", "test_per_class_accuracy", "zero_shot_accuracy", "main_samples"):
        assert resumed[key] == whole[key], key
    assert (read_json(runs["dirs"]["killed"], "initial_leaderboard.json")
            == read_json(runs["dirs"]["whole"], "initial_leaderboard.json"))


def test_resume_on_two_devices(runs):
    log = (runs["dirs"]["two_devices"] / "run.log").read_text()
    assert f"resuming from the checkpoint after epoch {KILL_AFTER_EPOCHS - 1}" in log
    assert "2 local devices" in log
    whole = checkpoint_lib.read_checkpoint(str(runs["dirs"]["whole"] / "checkpoints"))
    moved = checkpoint_lib.read_checkpoint(str(runs["dirs"]["two_devices"] / "checkpoints"))
    assert moved["epoch"] == EPOCHS
    np.testing.assert_array_equal(moved["loop"]["leaderboard"], whole["loop"]["leaderboard"])
    whole_leaves = flat_leaves(whole["state"])
    moved_leaves = flat_leaves(moved["state"])
    assert whole_leaves.keys() == moved_leaves.keys()
    # Sums over 2 devices instead of 4 group the float additions differently.
    for path, value in whole_leaves.items():
        np.testing.assert_allclose(moved_leaves[path], value, rtol=1e-4, atol=1e-6, err_msg=path)
    whole_metrics = read_metrics(runs["dirs"]["whole"])
    moved_metrics = read_metrics(runs["dirs"]["two_devices"])
    assert [r["epoch"] for r in moved_metrics] == list(range(EPOCHS))
    for whole_record, moved_record in zip(whole_metrics, moved_metrics):
        assert moved_record["confident_counts"] == whole_record["confident_counts"]
        assert moved_record["loss"] == pytest.approx(whole_record["loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Atomic checkpoint writes.


def small_state(epoch):
    return {"w": np.full((3, 4), epoch, np.float32), "step": np.asarray(epoch, np.int32)}


def small_loop_state(epoch):
    return loop_lib.LoopState(epoch=epoch, leaderboard=np.full((2, 3), epoch, np.int64),
                              counts=np.full(2, epoch, np.int64))


def test_stray_temporary_folder_is_ignored(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = checkpoint_lib.RunCheckpointer(str(directory), {"model": "m"})
    checkpointer.save(small_state(1), small_loop_state(1))
    checkpointer.close()
    # What a save of epoch 2 killed before its final rename leaves behind.
    stray = directory / "2.orbax-checkpoint-tmp"
    shutil.copytree(directory / "1", stray)
    (stray / "state" / "partial").write_bytes(b"\x00" * 100)

    reopened = checkpoint_lib.RunCheckpointer(str(directory), {"model": "m"})
    assert not stray.exists(), "opening the folder should delete the unfinished save"
    assert reopened.latest_epoch() == 1
    state, loop_state = reopened.restore(small_state(0))
    np.testing.assert_array_equal(state["w"], small_state(1)["w"])
    assert loop_state.epoch == 1
    reopened.save(small_state(2), small_loop_state(2))
    assert reopened.latest_epoch() == 2
    state, loop_state = reopened.restore(small_state(0))
    np.testing.assert_array_equal(state["w"], small_state(2)["w"])
    assert loop_state.epoch == 2
    reopened.close()
    assert not stray.exists()


SAVE_FOREVER = """
import sys
import numpy as np
from cap_jax import checkpoint, loop

checkpointer = checkpoint.RunCheckpointer(sys.argv[1], {"model": "m"}, max_to_keep=3)
for epoch in range(1, 10000):
    print(f"saving {epoch}", flush=True)
    checkpointer.save(
        {"w": np.full(4_000_000, epoch, np.float32)},
        loop.LoopState(epoch=epoch, leaderboard=np.full((2, 2), epoch, np.int64),
                       counts=np.full(2, epoch, np.int64)))
"""


def test_kill_during_save_keeps_last_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(directory)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                               text=True)
    try:
        for line in process.stdout:
            if line.strip() == "saving 3":
                break
        # 16 MB take longer than this to write, so the kill lands inside the save of epoch 3.
        time.sleep(0.03)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)

    checkpointer = checkpoint_lib.RunCheckpointer(str(directory), {"model": "m"})
    latest = checkpointer.latest_epoch()
    assert latest in (2, 3)
    state, loop_state = checkpointer.restore({"w": np.zeros(4_000_000, np.float32)})
    assert loop_state.epoch == latest
    assert np.all(state["w"] == latest)
    checkpointer.close()
    # Opening the directory deleted what the interrupted save left, if it left anything.
    assert not [name for name in os.listdir(directory) if "tmp" in name]
