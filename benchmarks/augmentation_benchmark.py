"""Training throughput with the augmentation on the host vs. in the training step (``on_device``).

What it measures
----------------
Two copies of one compiled model (same architecture, same initial weights, compiled like the
training pipeline: Adam, ``dice_ce``, the per-class Dice metrics) train in ONE process, each
through its own ``SliceLoader`` over the same synthetic shards, with the default
``AugmentationConfig()`` (flip, rotation + scaling, intensity jitter, each with probability 0.5):

* ``host``: ``on_device: false``, the loader augments with NumPy/SciPy (``workers`` threads);
* ``device``: ``on_device: true``, the loader sends ``(images, labels uint8, draws)`` and the
  training step applies them with ``keras.ops`` (``train_step_augmentation``, as
  ``fit_with_resume`` does).

After one warm-up epoch of each (tracing excluded), ``--rounds`` rounds of one epoch of each
alternate which goes first; the epoch time comes from ``on_epoch_begin``/``on_epoch_end``. The
ratio host/device of the epoch times (= device slices/s over host slices/s) is computed per round
and its median is reported: above 1 the device path is faster. Interleaving in one process keeps
the noise of a shared machine out of the ratio.

The shards are synthetic (noise plus a bright block, labels 0/1/2): augmentation costs do not
depend on the content. The defaults are conf/base's CPU geometry and U-Net (96 px, base 16,
depth 4, batch 8, one loader worker).

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.augmentation_benchmark                  # TensorFlow (the CPU default)
    KERAS_BACKEND=jax .venv/bin/python -m benchmarks.augmentation_benchmark --size 256 --base-filters 32

Results: ``data/08_reporting/benchmarks/augmentation_benchmark.json`` and a line on stdout.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import _common


def synthetic_cases(n_cases: int, slices: int, size: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cases = {}
    for c in range(n_cases):
        labels = np.zeros((slices, size, size), np.uint8)
        top, left = size // 3 + c % 5, size // 4 + c % 7
        labels[:, top:top + size // 4, left:left + size // 3] = 1
        labels[slices // 3:, top + 4:top + 10, left + 4:left + 12] = 2
        images = (rng.normal(size=labels.shape) + labels).astype(np.float32)
        cases[f"case_{c:03d}"] = (images, labels)
    return cases


def run(args: argparse.Namespace) -> dict:
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.augmentation import AugmentationConfig  # noqa: PLC0415
    from pancreas_seg.learning.device_augmentation import train_step_augmentation  # noqa: PLC0415
    from pancreas_seg.learning.loader import SliceLoader  # noqa: PLC0415
    from pancreas_seg.learning.setup import compile_model  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    cases = synthetic_cases(args.cases, args.slices, args.size)
    settings = {"learning_rate": 2e-3, "lr_schedule": "constant", "loss": "dice_ce", "dice_smooth": 1.0}
    loaders, models = {}, {}
    for name in ("host", "device"):
        loaders[name] = SliceLoader(cases, args.batch_size, "multiclass", training=True, seed=42,
                                    augmentation=AugmentationConfig(on_device=name == "device"),
                                    steps_per_epoch=args.steps, workers=args.workers)
        keras.utils.set_random_seed(42)
        models[name] = compile_model(build_model("unet", (args.size, args.size, 1), "multiclass",
                                                 base_filters=args.base_filters, depth=args.depth,
                                                 dropout=0.1, l2_weight=1e-4), settings, "multiclass")
    def epoch(name: str) -> float:
        return _common.fit_epoch_seconds(models[name], loaders[name], shuffle=False)

    times: dict[str, list[float]] = {"host": [], "device": []}
    ratios = []
    with train_step_augmentation(models["device"], loaders["device"]):
        warmup = {name: epoch(name) for name in ("host", "device")}
        for r in range(args.rounds):
            for name in ("host", "device") if r % 2 == 0 else ("device", "host"):
                times[name].append(epoch(name))
            ratios.append(times["host"][-1] / times["device"][-1])
    slices = args.steps * args.batch_size
    return {"backend": keras.backend.backend(), "settings": vars(args), "warmup_epoch_s": warmup,
            "epoch_s": times, "round_ratios_host_over_device": ratios,
            "host_slices_per_s": slices / _common.median(times["host"]),
            "device_slices_per_s": slices / _common.median(times["device"]),
            "median_ratio_host_over_device": _common.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96, help="slice H = W, px (conf/base: 96)")
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="training batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs of each variant")
    parser.add_argument("--workers", type=int, default=1, help="loader threads (conf/base: 1)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--slices", type=int, default=40, help="slices per synthetic case")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = run(args)
    print(f"{result['backend']}: host {result['host_slices_per_s']:.2f} slices/s, device "
          f"{result['device_slices_per_s']:.2f} slices/s, median ratio host/device epoch time "
          f"{result['median_ratio_host_over_device']:.3f} (rounds "
          f"{[round(x, 3) for x in result['round_ratios_host_over_device']]})")
    path = _common.write_report("augmentation_benchmark", {**result, "total_wall_s": time.perf_counter() - t0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
