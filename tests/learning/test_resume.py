"""Kill-safe resume of ``fit_with_resume``: a training process killed with SIGKILL right after an
epoch's checkpoint resumes at the next epoch in a fresh process, a finished training is not
repeated, another fingerprint starts afresh (the old checkpoint is moved aside), and the resumed
run reproduces an uninterrupted one: with the poly schedule (conf/base) and with conf/msd's
ReduceLROnPlateau + EarlyStopping (same learning rates per epoch, same stopping epoch, same
weights) and with the augmentation applied in the training step (``augmentation.on_device``, the
draws keyed on seed, epoch and batch), and an early-stopped run is not continued when re-run.

``RESUME_TEST_KERAS_BACKEND=jax`` runs the training processes under another backend
(default: tensorflow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pancreas_seg.learning.training import committed_checkpoint, read_checkpoint_state

# The trainings run in child processes (the `runs` fixture): left out of `make test-fast`.
pytestmark = pytest.mark.subprocess

# Runs fit_with_resume once per entry of the JSON list in argv[2] ({checkpoint_dir, fingerprint,
# epochs, optional kill_after_epoch and FitConfig settings}) and prints one "RESULT {json}" line
# per call. It imports what the training node
# imports (the node's compile_model imports losses/metrics lazily, inside build()).
FIT_SCRIPT = r'''
import json, logging, os, signal, sys, traceback
from pathlib import Path

import keras
import numpy as np

from pancreas_seg.learning.augmentation import AugmentationConfig
from pancreas_seg.learning.loader import SliceLoader
from pancreas_seg.learning.training import FitConfig, committed_checkpoint, fit_with_resume, read_checkpoint_state
from pancreas_seg.models.io import load_model
from pancreas_seg.models.registry import build_model
from pancreas_seg.learning.setup import compile_model

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
data_dir, calls = Path(sys.argv[1]), json.loads(sys.argv[2])


def cases(split):
    ids = sorted(p.name[:-len("_image.npy")] for p in data_dir.glob(f"{split}*_image.npy"))
    return {c: (np.load(data_dir / f"{c}_image.npy", mmap_mode="r"),
                np.load(data_dir / f"{c}_label.npy", mmap_mode="r")) for c in ids}


class KillAfterEpoch(keras.callbacks.Callback):
    """Runs after ResumableCheckpoint (fit_with_resume puts extra callbacks last): kill -9."""

    def __init__(self, epoch):
        super().__init__()
        self.kill_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.kill_epoch == epoch + 1:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class EpochsTrained(keras.callbacks.Callback):
    """The 0-based epochs this process trained and the optimizer's learning rate at their start."""

    def __init__(self):
        super().__init__()
        self.epochs, self.learning_rates = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.learning_rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


STEPS = 3  # per epoch


def fit(call):
    # poly (default): a resume must also continue the learning-rate curve (saved with the optimizer);
    # TOTAL_STEPS: the 3-epoch runs, 3 steps each: poly reaches 0 at the end.
    fit_settings = {"batch_size": 4, "steps_per_epoch": STEPS, "learning_rate": 5e-3, "lr_schedule": "poly",
                    "monitor": "val_dice_pancreas", "seed": 42, **call.get("fit", {}), "epochs": call["epochs"]}
    config = FitConfig(**fit_settings)
    settings = {"learning_rate": config.learning_rate, "lr_schedule": config.lr_schedule, "loss": "dice_ce",
                "dice_smooth": 1.0}

    def build():
        model = build_model("unet_small", (32, 32, 1), "multiclass", base_filters=4, depth=2,
                            dropout=0.0, l2_weight=0.0)
        return compile_model(model, settings, "multiclass", total_steps=3 * STEPS)

    augmentation = AugmentationConfig.from_params(call.get("augmentation", {"enabled": False}))
    train = SliceLoader(cases("train"), 4, "multiclass", training=True, foreground_fraction=0.5,
                        seed=config.seed, steps_per_epoch=config.steps_per_epoch, augmentation=augmentation)
    validation = SliceLoader(cases("val"), 4, "multiclass", training=False)
    trained = EpochsTrained()
    result = fit_with_resume(build, train, validation, config, Path(call["checkpoint_dir"]),
                             call["fingerprint"], label="tiny",
                             callbacks=[trained, KillAfterEpoch(call.get("kill_after_epoch"))])
    checkpoint_dir = Path(call["checkpoint_dir"])
    last = load_model(committed_checkpoint(checkpoint_dir, read_checkpoint_state(checkpoint_dir)))
    return {"backend": keras.backend.backend(), "resumed_from_epoch": result.resumed_from_epoch,
            "history": result.history, "best_value": result.best_value, "epochs_trained": trained.epochs,
            "epoch_learning_rates": trained.learning_rates,
            "best_output_shape": list(result.model.output_shape),
            "optimizer_iterations": int(keras.ops.convert_to_numpy(last.optimizer.iterations)),
            "learning_rate": float(keras.ops.convert_to_numpy(last.optimizer.learning_rate)),
            "last_weights": [w.ravel().tolist() for w in last.get_weights()],
            "best_weights": [w.ravel().tolist() for w in result.model.get_weights()]}


for call in calls:  # each call reports on its own, so one failure does not hide the others
    try:
        outcome = fit(call)
    except Exception:
        outcome = {"error": traceback.format_exc()}
    print("RESULT " + json.dumps(outcome), flush=True)
'''

STEPS_PER_EPOCH = 3
BACKEND = os.environ.get("RESUME_TEST_KERAS_BACKEND", "tensorflow")
# conf/msd's callbacks (constant lr, ReduceLROnPlateau, EarlyStopping) with patiences small enough
# to fire within a few epochs: val_dice_tumour peaks after a few epochs on this tiny data, then the
# rate is cut every epoch and the run stops (checked in test_msd_callbacks_fire_in_the_reference_run).
MSD_FIT = {"lr_schedule": "constant", "monitor": "val_dice_tumour", "reduce_lr_patience": 1,
           "reduce_lr_factor": 0.5, "early_stopping_patience": 3, "min_learning_rate": 1e-6}
MSD_EPOCHS = 8
#: The default augmentation, applied in the training step (conf/msd's on_device).
DEVICE_AUGMENTATION = {"on_device": True}
#: Calls per process of the reference and rerun chains (see `runs`).
CHAIN_CALLS = 5


def _first_cut(learning_rates: list[float]) -> int | None:
    """The 1-based epoch at whose end the learning rate was first cut (None: never)."""
    return next((i for i in range(1, len(learning_rates)) if learning_rates[i] < learning_rates[i - 1]), None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small random train/val cases as .npy shards (foreground in a few slices)."""
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for case_id, n_slices in (("train_a", 12), ("train_b", 10), ("val_a", 6)):
        label = np.zeros((n_slices, 32, 32), np.uint8)
        for z in range(1, n_slices, 4):
            r, c = rng.integers(4, 16, size=2)
            label[z, r:r + 12, c:c + 12] = 1
            label[z, r + 3:r + 7, c + 3:c + 7] = 2
        image = (rng.normal(0.0, 0.3, label.shape) + label).astype(np.float32)
        np.save(directory / f"{case_id}_image.npy", image)
        np.save(directory / f"{case_id}_label.npy", label)
    (directory / "fit.py").write_text(FIT_SCRIPT)
    return directory


def _start(shards: Path, calls: list[dict]) -> subprocess.Popen:
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2"}
    calls = [{"epochs": 3, "fingerprint": "abc", **call} for call in calls]
    return subprocess.Popen([sys.executable, str(shards / "fit.py"), str(shards), json.dumps(calls)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _results(process: subprocess.CompletedProcess, expected: int) -> list[dict]:
    """The per-call outcomes; a call that raised is reported with its traceback."""
    results = [json.loads(line[len("RESULT "):]) for line in process.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert process.returncode == 0 and len(results) == expected, process.stderr[-4000:]
    return results


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("error")
    return result


def _state(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "state.json").read_text())


@pytest.fixture(scope="module")
def runs(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Chains of processes (at most two at a time):

    * the uninterrupted references: poly, then (same process) one epoch in the same folder with
      another fingerprint; msd (conf/msd's callbacks), then the same msd training again (finished);
    * side by side: a poly 3-epoch training killed with SIGKILL after epoch 1;
    * then the msd training killed with SIGKILL right after the epoch whose end cut the learning
      rate first in the reference (the cut must be in the checkpoint; early stopping is waiting);
    * the same poly training with the augmentation on the device: uninterrupted (last call of the
      reference chain) and killed after epoch 1 (beside the msd one);
    * then one fresh process that reruns each killed one (resume) and reruns it again (nothing left).
    """
    root = tmp_path_factory.mktemp("run")
    checkpoint_dir, reference_dir = root / "checkpoints", root / "reference"
    msd_dir, msd_reference_dir = root / "msd", root / "msd_reference"
    poly = {"checkpoint_dir": str(checkpoint_dir)}
    msd = {"checkpoint_dir": str(msd_dir), "epochs": MSD_EPOCHS, "fit": MSD_FIT}
    msd_reference = {**msd, "checkpoint_dir": str(msd_reference_dir)}
    device_dir = root / "device"
    device = {"checkpoint_dir": str(device_dir), "augmentation": DEVICE_AUGMENTATION}
    device_reference = {**device, "checkpoint_dir": str(root / "device_reference")}
    started = [_start(shards, [{**poly, "kill_after_epoch": 1}]),
               _start(shards, [{"checkpoint_dir": str(reference_dir)},
                               {"checkpoint_dir": str(reference_dir), "fingerprint": "other", "epochs": 1},
                               msd_reference, msd_reference, device_reference])]
    try:
        out = {"checkpoint_dir": checkpoint_dir, "reference_dir": reference_dir, "msd_dir": msd_dir,
               "killed": _finish(started[0])}
        out["files_after_kill"] = sorted(p.name for p in checkpoint_dir.iterdir())
        out["state_after_kill"] = _state(checkpoint_dir) if (checkpoint_dir / "state.json").exists() else None
        out["reference"] = _finish(started[1])
        out["msd_reference_state"] = _state(msd_reference_dir)
        msd_reference_result = _ok(_results(out["reference"], expected=CHAIN_CALLS)[2])
        out["msd_kill_after"] = _first_cut(msd_reference_result["epoch_learning_rates"]) or 1
        started.append(_start(shards, [{**msd, "kill_after_epoch": out["msd_kill_after"]}]))
        started.append(_start(shards, [{**device, "kill_after_epoch": 1}]))
        out["msd_killed"] = _finish(started[2])
        out["msd_state_after_kill"] = _state(msd_dir) if (msd_dir / "state.json").exists() else None
        out["device_killed"] = _finish(started[3])
        started.append(_start(shards, [poly, poly, msd, msd, device]))
        out["rerun"] = _finish(started[4])
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    return out


def test_kill_after_epoch_one_leaves_a_complete_checkpoint(runs: dict) -> None:
    killed = runs["killed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert "RESULT" not in killed.stdout
    state = runs["state_after_kill"]
    assert state is not None, "state.json must be written before the kill"
    assert state["completed_epochs"] == 1 and state["fingerprint"] == "abc"
    assert state["monitor"] == "val_dice_pancreas"
    assert len(state["history"]["loss"]) == 1
    assert {"loss", "dice_pancreas", "dice_tumour", "val_loss", "val_dice_pancreas",
            "val_dice_tumour"} <= set(state["history"])
    # Only finished files: the atomic writes leave no temporary files behind.
    # state.json names the checkpoint it commits; no older epoch's file is left
    assert state["checkpoint"] == "last-epoch-0001.keras"
    assert runs["files_after_kill"] == ["best.keras", "last-epoch-0001.keras", "state.json"]


def test_rerun_resumes_after_epoch_one_and_then_has_nothing_left_to_do(runs: dict) -> None:
    """Fails while ``fit_with_resume`` loads the last checkpoint before the custom loss/metric classes
    are registered in a fresh process ("Could not locate class 'DiceCrossEntropyLoss'")."""
    rerun = runs["rerun"]
    resumed, finished = (_ok(r) for r in _results(rerun, expected=CHAIN_CALLS)[:2])
    assert resumed["backend"] == BACKEND
    assert resumed["resumed_from_epoch"] == 1
    assert "resuming from" in rerun.stderr and "after epoch 1" in rerun.stderr
    assert resumed["epochs_trained"] == [1, 2]  # 0-based: epochs 2 and 3 only
    history = resumed["history"]
    assert all(len(values) == 3 for values in history.values()), history
    # Epoch 1 comes from the killed process, epochs 2-3 from this one.
    assert history["loss"][0] == runs["state_after_kill"]["history"]["loss"][0]
    assert np.all(np.isfinite(history["loss"]))
    assert resumed["best_value"] == pytest.approx(max(history["val_dice_pancreas"]))
    assert resumed["best_output_shape"] == [None, 32, 32, 3]
    # The optimizer state was restored: its step count continues across the kill.
    assert resumed["optimizer_iterations"] == 3 * STEPS_PER_EPOCH
    # ... and so did the poly learning-rate schedule: 5e-3 * (1 - 9/9)^0.9 = 0 after the last step.
    assert resumed["learning_rate"] == pytest.approx(0.0, abs=1e-9)

    # Rerunning a finished training: no epoch is trained and the history is unchanged.
    assert finished["resumed_from_epoch"] == 3
    assert finished["epochs_trained"] == []
    assert finished["history"] == history
    assert finished["optimizer_iterations"] == 3 * STEPS_PER_EPOCH
    assert "all 3 epochs already completed" in rerun.stderr


def test_other_fingerprint_starts_afresh_and_moves_the_old_checkpoint_aside(runs: dict) -> None:
    reference_dir = runs["reference_dir"]
    finished, other = (_ok(r) for r in _results(runs["reference"], expected=CHAIN_CALLS)[:2])
    assert finished["resumed_from_epoch"] == 0 and finished["epochs_trained"] == [0, 1, 2]
    assert other["resumed_from_epoch"] == 0 and other["epochs_trained"] == [0]
    assert all(len(values) == 1 for values in other["history"].values())
    assert "made with other settings" in runs["reference"].stderr
    stale = reference_dir.with_name(f"{reference_dir.name}.stale-abc")
    assert (stale / _state(stale)["checkpoint"]).is_file() and (stale / "best.keras").is_file()
    assert _state(stale)["fingerprint"] == "abc" and _state(stale)["completed_epochs"] == 3
    assert _state(stale)["history"] == finished["history"]
    state = _state(reference_dir)
    assert state["fingerprint"] == "other" and state["completed_epochs"] == 1


def test_resumed_training_reproduces_the_uninterrupted_one(runs: dict) -> None:
    """Same seed and data: the killed + resumed run must train on the same batches in the same
    order as the uninterrupted one, so the per-epoch losses agree (both runs are on one CPU;
    fresh runs here are bit-identical). Fails while Keras' own batch shuffling (``fit`` with
    ``shuffle=True``, drawn from Python's ``random`` re-seeded at resume) reorders the batches."""
    reference = _ok(_results(runs["reference"], expected=CHAIN_CALLS)[0])
    assert reference["resumed_from_epoch"] == 0 and reference["epochs_trained"] == [0, 1, 2]
    resumed = _ok(_results(runs["rerun"], expected=CHAIN_CALLS)[0])
    for key in ("loss", "val_loss", "dice_pancreas", "val_dice_pancreas"):
        np.testing.assert_allclose(resumed["history"][key], reference["history"][key], rtol=1e-5,
                                   err_msg=key)
    # the poly curve: the learning rate at the start of each epoch, across the kill
    np.testing.assert_allclose(resumed["epoch_learning_rates"], reference["epoch_learning_rates"][1:], rtol=1e-6)
    assert reference["epoch_learning_rates"][0] > reference["epoch_learning_rates"][1] > \
        reference["epoch_learning_rates"][2] > 0.0
    _assert_same_weights(resumed["last_weights"], reference["last_weights"])


def test_best_checkpoint_loads_in_safe_mode(runs: dict) -> None:
    from pancreas_seg.models.io import load_model  # noqa: PLC0415

    model = load_model(runs["checkpoint_dir"] / "best.keras")
    assert model.name == "unet_small"
    assert model.output_shape == (None, 32, 32, 3)
    assert type(model.loss).__name__ == "DiceCrossEntropyLoss"
    compile_config = json.dumps(model.get_compile_config())
    assert "ClassDice" in compile_config and "dice_tumour" in compile_config
    probabilities = model.predict(np.zeros((2, 32, 32, 1), np.float32), verbose=0)
    assert probabilities.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


def _assert_same_weights(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7, err_msg=f"weight {index}")


def test_msd_callbacks_fire_in_the_reference_run(runs: dict) -> None:
    """The scenario the resume tests rely on: the learning rate is cut at the end of the killed
    epoch, early stopping's wait counter is running at the kill, and the run stops early."""
    reference = _ok(_results(runs["reference"], expected=CHAIN_CALLS)[2])
    lrs = reference["epoch_learning_rates"]
    kill_after = _first_cut(lrs)
    stopped_after = len(reference["epochs_trained"])
    assert kill_after is not None, ("ReduceLROnPlateau never fired", reference["history"])
    assert kill_after < stopped_after < MSD_EPOCHS, reference["history"]
    state = runs["msd_reference_state"]
    assert state["stopped_early"] is True and state["finished"] is True
    assert state["completed_epochs"] == stopped_after
    assert state["callbacks"]["early_stopping"]["wait"] >= MSD_FIT["early_stopping_patience"]
    killed = runs["msd_state_after_kill"]
    assert killed["completed_epochs"] == kill_after and killed["finished"] is False
    assert killed["stopped_early"] is False
    assert killed["callbacks"]["early_stopping"]["wait"] >= 1
    assert killed["callbacks"]["reduce_lr_on_plateau"]["best"] is not None
    # the cut made at the end of the killed epoch is in state.json and in its checkpoint
    assert killed["learning_rate"] == pytest.approx(lrs[kill_after], rel=1e-6)
    assert killed["learning_rate"] == pytest.approx(lrs[kill_after - 1] * MSD_FIT["reduce_lr_factor"], rel=1e-6)


def test_msd_callbacks_resume_exactly_after_kill(runs: dict) -> None:
    """Killed right after the first ReduceLROnPlateau cut, with early stopping waiting, and
    resumed: the same learning rate per epoch, losses, stopping epoch and weights as the
    uninterrupted run. Fails when the callbacks' wait/best counters restart at resume (the run
    stops later and cuts the rate at other epochs) or when last.keras is written before the cut
    (the resumed epoch uses the old rate)."""
    killed = runs["msd_killed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    kill_after = runs["msd_kill_after"]
    reference = _ok(_results(runs["reference"], expected=CHAIN_CALLS)[2])
    resumed = _ok(_results(runs["rerun"], expected=CHAIN_CALLS)[2])
    assert resumed["resumed_from_epoch"] == kill_after
    assert resumed["epochs_trained"] == reference["epochs_trained"][kill_after:]
    np.testing.assert_allclose(resumed["epoch_learning_rates"], reference["epoch_learning_rates"][kill_after:],
                               rtol=1e-6)
    assert len(resumed["history"]["loss"]) == len(reference["history"]["loss"])
    for key in ("loss", "val_loss", "val_dice_pancreas", "val_dice_tumour", "learning_rate"):
        np.testing.assert_allclose(resumed["history"][key], reference["history"][key], rtol=1e-5,
                                   err_msg=key)
    assert resumed["best_value"] == reference["best_value"]
    _assert_same_weights(resumed["last_weights"], reference["last_weights"])
    _assert_same_weights(resumed["best_weights"], reference["best_weights"])
    assert _state(runs["msd_dir"])["stopped_early"] is True


def test_early_stopped_run_is_not_continued_when_rerun(runs: dict) -> None:
    """Fails while a rerun only compares completed epochs with ``epochs`` (it trains on)."""
    for chain in ("reference", "rerun"):
        first, again = (_ok(r) for r in _results(runs[chain], expected=CHAIN_CALLS)[2:4])
        stopped_after = len(first["history"]["loss"])
        assert stopped_after < MSD_EPOCHS
        assert again["resumed_from_epoch"] == stopped_after
        assert again["epochs_trained"] == []
        assert again["history"] == first["history"]
        assert again["best_value"] == first["best_value"]
        _assert_same_weights(again["best_weights"], first["best_weights"])
        _assert_same_weights(again["last_weights"], first["last_weights"])
        assert f"stopped early after epoch {stopped_after}" in runs[chain].stderr


def test_an_orphan_checkpoint_of_an_uncommitted_epoch_is_ignored(tmp_path: Path) -> None:
    """A kill between writing epoch 2's model file and its state.json leaves that file behind:
    the committed pair (epoch 1) is what resumes, never the newer, uncommitted weights."""
    from pancreas_seg.learning.training import last_checkpoint_name  # noqa: PLC0415

    (tmp_path / last_checkpoint_name(1)).write_bytes(b"epoch 1")
    (tmp_path / last_checkpoint_name(2)).write_bytes(b"epoch 2, not committed")
    (tmp_path / "state.json").write_text(json.dumps({"completed_epochs": 1, "checkpoint": last_checkpoint_name(1)}))
    state = read_checkpoint_state(tmp_path)
    assert state is not None and committed_checkpoint(tmp_path, state).read_bytes() == b"epoch 1"
    (tmp_path / last_checkpoint_name(1)).unlink()  # a state whose model file is gone is no checkpoint
    assert read_checkpoint_state(tmp_path) is None


def test_augmentation_on_the_device_resumes_exactly(runs: dict) -> None:
    """With the draws applied in the training step, the run killed after epoch 1 and resumed
    equals the uninterrupted one (the draws are keyed on seed, epoch and batch, like the batches),
    and the augmentation did change what was trained (other losses than without it)."""
    killed = runs["device_killed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    reference = _ok(_results(runs["reference"], expected=CHAIN_CALLS)[4])
    resumed = _ok(_results(runs["rerun"], expected=CHAIN_CALLS)[4])
    assert reference["epochs_trained"] == [0, 1, 2]
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_trained"] == [1, 2]
    for key in ("loss", "val_loss", "dice_pancreas", "val_dice_pancreas"):
        np.testing.assert_allclose(resumed["history"][key], reference["history"][key], rtol=1e-5, err_msg=key)
    _assert_same_weights(resumed["last_weights"], reference["last_weights"])
    _assert_same_weights(resumed["best_weights"], reference["best_weights"])
    plain = _ok(_results(runs["reference"], expected=CHAIN_CALLS)[0])
    assert not np.allclose(reference["history"]["loss"], plain["history"]["loss"], rtol=1e-3)
