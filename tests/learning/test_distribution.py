"""``training.distribution: data_parallel`` (learning/distribution.py) on two real JAX CPU devices.

XLA must be told to expose two host devices before JAX is imported, so the training runs in a
fresh interpreter (``KERAS_BACKEND=jax``, ``XLA_FLAGS=--xla_force_host_platform_device_count=2``);
this pytest process keeps its own backend (TensorFlow by default). One script trains the project's
U-Net (Dice + cross-entropy loss, Dice metrics, poly schedule) through ``fit_with_resume`` fed by
``SliceLoader`` with augmentation on, three times with the same seed and the same global batch:

* on one device, stopped after epoch 1 of 2 (the reference);
* data parallel on 2 devices, stopped after epoch 1 of 2 (its checkpoint is committed first);
* resuming that checkpoint for epoch 2 on 2 devices, and (a copy of it) on 1 device.

Dropout stays at the project's 0.1: Keras draws the dropout masks from its seeded generator with
JAX's sharding-invariant ("partitionable") threefry, so the same seed gives the same masks
whether a batch sits on one device or is split over two; batch normalisation uses the statistics
of the global batch in both cases (the train step is one XLA program over the mesh). The runs
therefore compute the same thing and differ only in float32 summation order.

Epoch 2 of the resumed runs is compared with each other, not with an uninterrupted run: Keras does
not restore a dropout layer's seed-generator state from a ``.keras`` file, so any resumed run with
dropout (on one device too) draws other masks than an uninterrupted one would
(tests/learning/test_resume.py checks exact resume with dropout 0).

A second test starts two processes with one device each, joined through Keras' multi-process
environment variables (the SLURM recipe of docs/distributed_training.md), and checks that they
train the same model as one device.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Float32 summation order (per-device partial sums, then a cross-device reduction) is all that
# differs between one and two devices (the tests print the measured differences with -s).
# Losses, metrics and the weights after epoch 1 (2 steps): relative 1e-4, absolute 1e-5; measured
# up to 2e-6 (val_loss) and 6e-7 (weights, which are O(0.01-1)).
RTOL, ATOL = 1e-4, 1e-5
# Weights after two more steps: Adam moves every weight by about the learning rate (2e-3) whatever
# the size of its gradient, so a rounding-level difference in a near-zero gradient can change a
# step by a visible fraction of it. Absolute 2e-4, a tenth of one step; measured 6.5e-5.
RESUMED_WEIGHT_ATOL = 2e-4

# Scripts for the ``jax_script`` fixture (tests/conftest.py), which puts the ``import jax`` check first.
COMMON = r'''
import json, os, sys, time
from pathlib import Path

import jax
import keras
import numpy as np

from pancreas_seg.learning.augmentation import AugmentationConfig
from pancreas_seg.learning.loader import SliceLoader
from pancreas_seg.learning.setup import compile_model
from pancreas_seg.learning.training import FitConfig, fit_with_resume, read_checkpoint_state
from pancreas_seg.models.registry import build_model

out = Path(sys.argv[1])
EPOCHS, BATCH, STEPS = 2, 4, 2
SETTINGS = {"epochs": EPOCHS, "batch_size": BATCH, "steps_per_epoch": STEPS, "learning_rate": 2e-3,
            "lr_schedule": "poly", "loss": "dice_ce", "dice_smooth": 1.0, "monitor": "val_dice_pancreas",
            "seed": 42}
AUGMENTATION = AugmentationConfig.from_params({
    "enabled": True, "flip_probability": 0.5, "spatial_probability": 0.5, "rotation_deg": 10.0,
    "scale_range": [0.9, 1.1], "intensity_probability": 0.5, "intensity_scale": 0.1, "intensity_shift": 0.05})


def case(rng, slices):
    label = np.zeros((slices, 32, 32), "uint8")
    label[:, 10:20, 12:22] = 1
    label[: slices // 2, 14:17, 15:18] = 2
    return rng.normal(size=(slices, 32, 32)).astype("float32") + label, label


def loaders():
    """Deterministic cases; 7 validation slices in batches of 4: the last batch (3) does not split."""
    rng = np.random.default_rng(0)
    train = {"a": case(rng, 6), "b": case(rng, 5)}
    validation = {"c": case(rng, 7)}
    return (SliceLoader(train, BATCH, "multiclass", True, augmentation=AUGMENTATION, seed=42,
                        steps_per_epoch=STEPS),
            SliceLoader(validation, BATCH, "multiclass", False, seed=42))


def build():
    model = build_model("unet", (32, 32, 1), "multiclass", base_filters=4, depth=2, dropout=0.1,
                        l2_weight=1e-4)
    return compile_model(model, SETTINGS, "multiclass", total_steps=EPOCHS * STEPS)


class Weights(keras.callbacks.Callback):
    """The weights after each epoch (as NumPy) and the epochs this process trained."""

    def __init__(self):
        super().__init__()
        self.weights, self.epochs = {}, []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch + 1)
        self.weights[epoch + 1] = [np.asarray(w) for w in self.model.get_weights()]


class StopAfterEpoch(keras.callbacks.Callback):
    """Ends fit after ``epoch`` once its checkpoint is committed (extra callbacks run after it),
    leaving an unfinished run to resume, as a killed job would."""

    def __init__(self, epoch):
        super().__init__()
        self.stop_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.stop_epoch:
            self.model.stop_training = True


def fit(name, distribution, build_fn=build, stop_after=None, tag=None):
    """fit_with_resume with checkpoints in out/<name>; the weights of each epoch go to
    out/<tag>-epoch<N>.npz (tag defaults to name)."""
    train, validation = loaders()
    weights = Weights()
    started = time.perf_counter()
    result = fit_with_resume(build_fn, train, validation,
                             FitConfig.from_settings({**SETTINGS, "distribution": distribution}),
                             out / name, "distribution-test", label=name,
                             callbacks=[weights] + ([StopAfterEpoch(stop_after)] if stop_after else []))
    for epoch, values in weights.weights.items():
        np.savez(out / f"{tag or name}-epoch{epoch}.npz", *values)
    return {"history": result.history, "resumed_from_epoch": result.resumed_from_epoch,
            "epochs_trained": weights.epochs, "seconds": time.perf_counter() - started,
            "state": read_checkpoint_state(out / name)}
'''

MAIN = COMMON + r'''
import shutil

from pancreas_seg.learning.distribution import placement

report = {"backend": keras.backend.backend(), "devices": keras.distribution.list_devices()}
report["one"] = fit("one", None, stop_after=1)

# The sharding the compiled train and test steps see for their input images.
seen = []


def describe(kind, shape):
    def record(sharding):
        rows = sorted([index[0].start or 0, shape[0] if index[0].stop is None else index[0].stop]
                      for index in sharding.devices_indices_map(tuple(shape)).values())
        seen.append({"step": kind, "shape": list(shape), "spec": str(getattr(sharding, "spec", None)),
                     "devices": sorted(str(d) for d in sharding.device_set), "device_rows": rows,
                     "shard_shape": list(sharding.shard_shape(tuple(shape)))})
    return record


def build_probed():
    model = build()
    for kind in ("train", "test"):
        step = getattr(model, f"{kind}_step")

        def probed(state, data, step=step, kind=kind):
            jax.debug.inspect_array_sharding(data[0], callback=describe(kind, data[0].shape))
            return step(state, data)

        setattr(model, f"{kind}_step", probed)
    return model


report["two_epoch1"] = fit("two", "data_parallel", build_probed, stop_after=1)
report["sharding"] = seen
shutil.copytree(out / "two", out / "two-on-one")
report["two_resumed"] = fit("two", "data_parallel")
report["two_resumed_on_one"] = fit("two-on-one", None)

errors = {}
for key, (setting, batch) in {"batch_3": ("data_parallel", 3),
                              "devices_3": ({"type": "data_parallel", "devices": 3}, 4),
                              "unknown_device": ({"type": "data_parallel", "devices": ["cpu:7"]}, 4)}.items():
    try:
        placement(setting, batch)
        errors[key] = None
    except ValueError as error:
        errors[key] = str(error)
report["errors"] = errors
report["first_device_only"] = placement({"type": "data_parallel", "devices": 1}, 3).devices
(out / "report.json").write_text(json.dumps(report))
'''

PROCESS = COMMON + r'''
from pancreas_seg.hooks import MultiProcessHook
from pancreas_seg.learning.distribution import initialize_multi_process

MultiProcessHook().after_context_created(None)  # what `kedro run` does first: join the two processes
settings = initialize_multi_process()  # already joined: returns the settings it joined with
report = {"process": settings.process_id, "processes": jax.process_count(),
          "local_devices": [str(d) for d in jax.local_devices()], "devices": keras.distribution.list_devices()}
# One checkpoint folder for both processes (shared storage): process 0 writes it, both resume from it.
tag = f"process{settings.process_id}"
report["epoch1"] = fit("shared", "data_parallel", stop_after=1, tag=tag)
report["resumed"] = fit("shared", "data_parallel", tag=tag)
(out / f"{tag}.json").write_text(json.dumps(report))
'''


def _weights(directory: Path, name: str) -> list[np.ndarray]:
    with np.load(directory / f"{name}.npz") as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def _max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [w.shape for w in a] == [w.shape for w in b]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory: pytest.TempPathFactory, jax_script) -> tuple[dict, Path]:
    """The report of the one-device, two-device and resumed runs, and the folder of their weights."""
    out = tmp_path_factory.mktemp("distribution")
    jax_script.run(out / "main.py", MAIN, str(out), xla_flags=["--xla_force_host_platform_device_count=2"],
                   timeout=600)
    return json.loads((out / "report.json").read_text()), out


def test_two_devices_train_what_one_device_trains(two_devices: tuple[dict, Path]) -> None:
    report, out = two_devices
    assert report["backend"] == "jax" and report["devices"] == ["cpu:0", "cpu:1"]
    one, two = report["one"]["history"], report["two_epoch1"]["history"]
    assert report["two_epoch1"]["epochs_trained"] == [1]
    for key in ("loss", "dice_pancreas", "dice_tumour", "val_loss", "val_dice_pancreas", "val_dice_tumour"):
        np.testing.assert_allclose(two[key], one[key][:1], rtol=RTOL, atol=ATOL, err_msg=key)
    single, parallel = _weights(out, "one-epoch1"), _weights(out, "two-epoch1")
    for a, b in zip(single, parallel, strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    print(f"\n1 vs 2 devices after epoch 1: loss {one['loss'][0]:.7f} vs {two['loss'][0]:.7f}, "  # noqa: T201
          f"val_loss difference {abs(one['val_loss'][0] - two['val_loss'][0]):.2e}, "
          f"largest weight difference {_max_difference(single, parallel):.2e} over {len(single)} weight arrays; "
          f"{report['one']['seconds']:.1f} s / {report['two_epoch1']['seconds']:.1f} s")


def test_training_batches_are_split_over_both_devices(two_devices: tuple[dict, Path]) -> None:
    report, _ = two_devices
    train = [s for s in report["sharding"] if s["step"] == "train"]
    assert train, report["sharding"]
    for seen in train:  # the images of the global batch of 4: rows 0-1 on one device, 2-3 on the other
        assert seen["shape"] == [4, 32, 32, 1]
        assert len(seen["devices"]) == 2
        assert seen["shard_shape"] == [2, 32, 32, 1]
        assert seen["device_rows"] == [[0, 2], [2, 4]]
        assert "batch" in seen["spec"]
    # Validation batches (4, then the remaining 3 slices) are whole on every device.
    test = {seen["shape"][0]: seen for seen in report["sharding"] if seen["step"] == "test"}
    assert sorted(test) == [3, 4]
    for rows, seen in test.items():
        assert seen["shard_shape"] == [rows, 32, 32, 1]
        assert seen["device_rows"] == [[0, rows], [0, rows]]


def test_resume_under_data_parallel_continues_the_run(two_devices: tuple[dict, Path]) -> None:
    """The checkpoint of epoch 1 written on 2 devices resumes on 2 devices, and on 1 device (the
    training node computes the same fingerprint for both: tests/pipelines/test_config_environments.py);
    both train epoch 2 to the same model."""
    report, out = two_devices
    stopped = report["two_epoch1"]
    assert stopped["state"]["completed_epochs"] == 1 and not stopped["state"]["finished"]
    resumed, on_one = report["two_resumed"], report["two_resumed_on_one"]
    for run in (resumed, on_one):
        assert run["resumed_from_epoch"] == 1 and run["epochs_trained"] == [2]
        assert run["state"]["completed_epochs"] == 2 and run["state"]["finished"]
        for key, values in stopped["history"].items():  # epoch 1 as it was logged before the stop
            assert run["history"][key][0] == values[0]
    for key in ("loss", "val_loss", "val_dice_pancreas", "learning_rate"):
        np.testing.assert_allclose(resumed["history"][key], on_one["history"][key], rtol=RTOL, atol=ATOL,
                                   err_msg=key)
    two, one = _weights(out, "two-epoch2"), _weights(out, "two-on-one-epoch2")
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RESUMED_WEIGHT_ATOL)
    print(f"\nepoch 2 after resume on 2 vs 1 device(s): largest weight difference "  # noqa: T201 (with -s)
          f"{_max_difference(one, two):.2e}")


def test_device_settings_are_checked(two_devices: tuple[dict, Path]) -> None:
    errors = two_devices[0]["errors"]
    assert "training.batch_size=3 does not divide by the 2 devices of training.distribution" in errors["batch_3"]
    assert "training.distribution.devices=3 but only 2 device(s)" in errors["devices_3"]
    assert "unknown device(s) ['cpu:7']" in errors["unknown_device"]
    assert two_devices[0]["first_device_only"] == ["cpu:0"]


def test_data_parallel_on_tensorflow_asks_for_jax(tmp_path: Path) -> None:
    """The default backend: distribution null trains as before; data_parallel stops with a clear error."""
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.distribution import Placement, placement  # noqa: PLC0415
    from pancreas_seg.learning.loader import SliceLoader  # noqa: PLC0415
    from pancreas_seg.learning.training import FitConfig, fit_with_resume  # noqa: PLC0415

    if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on KERAS_BACKEND
        pytest.skip(f"checks the TensorFlow backend; this process runs {keras.backend.backend()!r}")
    assert type(placement(None, 3)) is Placement
    label = np.zeros((4, 8, 8), "uint8")
    cases = {"a": (np.zeros((4, 8, 8), "float32"), label)}
    loader = SliceLoader(cases, 4, "multiclass", training=True, steps_per_epoch=1)
    with pytest.raises(RuntimeError, match=r"training.distribution=data_parallel needs the JAX backend.*"
                                           r"'tensorflow'.*KERAS_BACKEND=jax"):
        fit_with_resume(lambda: pytest.fail("no model is built"), loader, loader,
                        FitConfig(epochs=1, batch_size=4, distribution="data_parallel"), tmp_path, "fp")


@pytest.mark.parametrize(("setting", "expected"), [
    (None, (None, None)),
    ("data_parallel", ("data_parallel", None)),
    ({"type": "data_parallel", "devices": 2}, ("data_parallel", 2)),
    ({"type": "data_parallel", "devices": ["gpu:0", "gpu:1"]}, ("data_parallel", ("gpu:0", "gpu:1"))),
    ({"type": None}, (None, None)),
])
def test_distribution_setting_forms(setting: object, expected: tuple) -> None:
    from pancreas_seg.learning.distribution import DistributionConfig  # noqa: PLC0415

    config = DistributionConfig.from_setting(setting)
    assert (config.type, config.devices) == expected
    assert config.enabled == (expected[0] is not None)


@pytest.mark.parametrize(("setting", "message"), [
    ("model_parallel", "training.distribution.type must be null or one of"),
    ({"type": "data_parallel", "devices": 0}, "devices must be at least 1"),
    ({"type": "data_parallel", "devices": ["gpu:0", "gpu:0"]}, "lists a device twice"),
    ({"type": "data_parallel", "devices": []}, "non-empty list"),
    ({"type": "data_parallel", "mesh": [2]}, "unknown key"),
    ({"devices": 2}, "type is null"),
    (3, "must be null"),
])
def test_invalid_distribution_settings(setting: object, message: str) -> None:
    from pancreas_seg.learning.distribution import DistributionConfig  # noqa: PLC0415

    with pytest.raises(ValueError, match=message):
        DistributionConfig.from_setting(setting)


def test_multi_process_environment() -> None:
    from pancreas_seg.learning.distribution import MultiProcessSettings, multi_process_settings  # noqa: PLC0415

    assert multi_process_settings({}) is None
    assert multi_process_settings({"KERAS_DISTRIBUTION_NUM_PROCESSES": "1"}) is None
    env = {"KERAS_DISTRIBUTION_NUM_PROCESSES": "4", "KERAS_DISTRIBUTION_PROCESS_ID": "3",
           "KERAS_DISTRIBUTION_JOB_ADDRESSES": "node01:12355"}
    assert multi_process_settings(env) == MultiProcessSettings(4, 3, "node01:12355")
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_PROCESS_ID not set"):
        multi_process_settings({**env, "KERAS_DISTRIBUTION_PROCESS_ID": ""})
    with pytest.raises(ValueError, match=r"KERAS_DISTRIBUTION_PROCESS_ID=4 not in 0\.\.3"):
        multi_process_settings({**env, "KERAS_DISTRIBUTION_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="expected host:port"):
        multi_process_settings({**env, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "node01"})


def test_several_processes_need_a_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes joined into one run with distribution null would each train their own copy."""
    from pancreas_seg.learning.distribution import placement  # noqa: PLC0415

    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "0")
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "node01:12355")
    with pytest.raises(RuntimeError, match="2 processes joined this run .* training.distribution is null"):
        placement(None, 4)


@pytest.mark.slow
def test_two_processes_train_what_one_device_trains(two_devices: tuple[dict, Path], tmp_path: Path,
                                                     jax_script) -> None:
    """Two processes with one CPU device each, joined through the Kedro hook as under SLURM
    (docs/distributed_training.md), share one checkpoint folder that holds a checkpoint of other
    settings: process 0 moves it aside, both train epoch 1 as one device would (each feeding half
    of every global batch), stop, resume from the checkpoint process 0 wrote, and train epoch 2
    as the single-process data-parallel run did."""
    reference_report, reference = two_devices  # skips without JAX
    stale = tmp_path / "shared"
    stale.mkdir()
    (stale / "last-epoch-0003.keras").write_bytes(b"made with other settings")
    (stale / "state.json").write_text(json.dumps({"fingerprint": "other", "completed_epochs": 3,
                                                  "checkpoint": "last-epoch-0003.keras"}))
    import socket  # noqa: PLC0415

    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = jax_script.write(tmp_path / "process.py", PROCESS)
    logs = [tmp_path / f"process{rank}.log" for rank in range(2)]
    processes = []
    for rank, log in enumerate(logs):
        with log.open("w") as output:
            processes.append(subprocess.Popen(
                [sys.executable, str(script), str(tmp_path)], stdout=output, stderr=subprocess.STDOUT,
                env=jax_script.environment(KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                                           KERAS_DISTRIBUTION_PROCESS_ID=str(rank),
                                           KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}")))
    # A process that fails leaves the other waiting in a collective: stop both then.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes):
            break
        time.sleep(0.5)
    for p in processes:
        if p.poll() is None:
            p.kill()
        p.wait()
    for p, log in zip(processes, logs, strict=True):
        jax_script.skip_without_jax(p.returncode, log.read_text())
        assert p.returncode == 0, log.read_text()[-4000:]
    assert (tmp_path / "shared.stale-other" / "state.json").is_file()  # moved aside once, by process 0
    one = reference_report["one"]["history"]
    single, two_epoch2 = _weights(reference, "one-epoch1"), _weights(reference, "two-epoch2")
    for rank in range(2):
        report = json.loads((tmp_path / f"process{rank}.json").read_text())
        assert report["processes"] == 2 and len(report["local_devices"]) == 1 and len(report["devices"]) == 2
        for key in ("loss", "val_loss", "val_dice_pancreas"):
            np.testing.assert_allclose(report["epoch1"]["history"][key], one[key][:1], rtol=RTOL, atol=ATOL,
                                       err_msg=key)
        weights = _weights(tmp_path, f"process{rank}-epoch1")
        for a, b in zip(single, weights, strict=True):
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
        resumed = report["resumed"]
        assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_trained"] == [2]
        assert resumed["state"]["completed_epochs"] == 2 and resumed["state"]["finished"]
        np.testing.assert_allclose(resumed["history"]["loss"], reference_report["two_resumed"]["history"]["loss"],
                                   rtol=RTOL, atol=ATOL)
        resumed_weights = _weights(tmp_path, f"process{rank}-epoch2")
        for a, b in zip(two_epoch2, resumed_weights, strict=True):
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=RESUMED_WEIGHT_ATOL)
        print(f"\nprocess {rank} of 2: largest weight difference to one device after epoch 1 "  # noqa: T201
              f"{_max_difference(single, weights):.2e}, to 1 process on 2 devices after the resumed epoch 2 "
              f"{_max_difference(two_epoch2, resumed_weights):.2e}")
