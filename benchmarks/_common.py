"""Shared helpers for the scripts in ``benchmarks/`` (not a benchmark itself).

* :func:`ensure_phantoms_512` writes (once) and reuses the cached 30-case 512 x 512 x ~100
  SYNTHETIC phantom data set under ``data/01_raw/benchmark_phantoms_512/``.
* :func:`run_variant` runs ``python -m <module> --variant ...`` in a fresh subprocess and returns the
  JSON the child prints on its last stdout line, plus the child's peak RSS, so variants never
  pollute each other's peak memory.
* :func:`conf` / :func:`inference_settings` / :func:`single_stage_preprocessing`: the ``conf/base``
  settings as the pipelines get them (an environment over ``base``:
  :func:`pancreas_seg.learning.setup.merge_settings`, the project's own deep merge).
* :func:`untrained_single_stage_model`: an untrained model saved as ``.keras`` with a model card bound
  to its weights, as a ``TrainedModel`` for ``Predictor.from_trained`` (inference and serving benchmarks).
* :func:`segment_case`: one NIfTI scan through the inference pipeline's nodes and catalog datasets
  (read, segment, write the mask and the overlay PNG), as the inference and serving benchmarks time it.
* :func:`peak_rss_mib` / :func:`write_report` / :func:`print_table` / :func:`median`.

The benchmarks are modules of the dev-only ``benchmarks`` package (``from benchmarks import
_common``): run them as modules from the repository root, e.g.
``.venv/bin/python -m benchmarks.preprocessing_benchmark``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR = REPO_ROOT / "data" / "08_reporting" / "benchmarks"
PHANTOM_ROOT = REPO_ROOT / "data" / "01_raw" / "benchmark_phantoms_512"
PHANTOM_SEED = 512
N_PHANTOMS = 30
RESULT_PREFIX = "BENCH_RESULT_JSON:"
BENCHMARK_DATASET = "benchmark (untrained model)"
"""The ``dataset`` of the cards of the benchmarks' untrained models (trained on no cases)."""


def phantom_config() -> Any:
    """512 x 512 in-plane, 0.7-0.9 mm pixels, 1.5-1.7 mm slices over 150-170 mm: 88-113 slices."""
    from pancreas_seg.phantoms import PhantomConfig  # noqa: PLC0415

    return PhantomConfig(shape_xy_px=512, spacing_xy_mm=(0.7, 0.9), slice_thickness_mm=(1.5, 1.7),
                         z_extent_mm=(150.0, 170.0))


def ensure_phantoms_512(progress: bool = True) -> Path:
    """Write (or reuse, by fingerprint) the 30-case 512 px SYNTHETIC benchmark data set."""
    from pancreas_seg.phantoms import write_synthetic_task07  # noqa: PLC0415

    def report(i: int, n: int, case_id: str) -> None:
        if progress:
            print(f"  phantom {i}/{n} {case_id}", file=sys.stderr, flush=True)

    return write_synthetic_task07(PHANTOM_ROOT, n_train=N_PHANTOMS, n_test=0, config=phantom_config(),
                                  seed=PHANTOM_SEED, progress=report)


def conf(env: str, name: str) -> dict[str, Any]:
    """``conf/<env>/<name>`` as a dict (no Kedro: plain YAML)."""
    import yaml  # noqa: PLC0415

    return yaml.safe_load((REPO_ROOT / "conf" / env / name).read_text()) or {}


def inference_settings(batch_size: int | None = None, xla: bool = True) -> dict[str, Any]:
    """``conf/base/parameters_inference.yml``'s ``inference`` block, as the pipeline gets it."""
    settings = dict(conf("base", "parameters_inference.yml")["inference"])
    if batch_size is not None:
        settings["batch_size"] = batch_size
    settings["xla"] = bool(settings.get("xla", True)) and xla
    return settings


def single_stage_preprocessing(size_px: Sequence[int]) -> dict[str, Any]:
    """``conf/base``'s ``preprocessing`` (``crop_to_body``, window) at the input size ``size_px``."""
    return {**conf("base", "parameters_preprocessing.yml")["preprocessing"], "image_size_px": list(size_px)}


def save_untrained(name: str, input_shape: tuple[int, int, int], settings: dict[str, Any],
                   path: Path) -> tuple[int, str]:
    """Build an untrained model, save it to ``path``; returns (parameter count, weights SHA-256)."""
    import keras  # noqa: PLC0415

    from pancreas_seg.models.io import save_model, weights_sha256  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    built = build_model(name, input_shape, "multiclass", **settings)
    params, sha = int(built.count_params()), weights_sha256(built)
    save_model(built, path)
    del built
    keras.backend.clear_session()
    return params, sha


def untrained_single_stage_model(architecture: str, model_settings: dict[str, Any], size_px: Sequence[int],
                                 path: Path) -> tuple[Any, dict[str, Any]]:
    """A ``TrainedModel`` of an UNTRAINED ``architecture`` (multiclass) saved to ``path`` with a model
    card bound to its weights, preprocessing as :func:`single_stage_preprocessing` at ``size_px``;
    and facts about it (parameters, settings, size)."""
    from pancreas_seg.imaging.preprocess import PreprocessingConfig  # noqa: PLC0415
    from pancreas_seg.inference.model_card import CaseSplit, ModelCard  # noqa: PLC0415
    from pancreas_seg.inference.model_store import TrainedModel  # noqa: PLC0415

    preprocessing = single_stage_preprocessing(size_px)
    input_shape = (*size_px, PreprocessingConfig.from_params(preprocessing).context_slices)
    params, sha = save_untrained(architecture, input_shape, model_settings, path)
    card = ModelCard.for_trained_model(architecture, "multiclass", preprocessing, None, BENCHMARK_DATASET,
                                       CaseSplit((), ()), sha, input_shape=input_shape,
                                       version="benchmark (untrained)")
    return TrainedModel(path, card), {"params": params, "model_settings": model_settings,
                                      "image_size_px": list(size_px)}


def overlay_save_args() -> dict[str, Any]:
    """``savefig`` arguments of the ``inference_overlays`` partitions in ``conf/base/catalog.yml``."""
    return dict(conf("base", "catalog.yml")["inference_overlays"]["dataset"].get("save_args") or {})


def segment_case(predictor: Any, image_path: Path, output_dir: Path, window_hu: Sequence[float],
                 save_args: dict[str, Any]) -> Any:
    """One NIfTI scan from file to files through the inference pipeline's own code; the mask volume.

    As ``kedro run --pipelines=inference`` handles each case: the scan as
    :class:`~pancreas_seg.pipelines.inference.nodes.Scan`, segmented by the lazy partition of
    ``nodes.segment_scans``, saved by the catalog's ``NiftiDataset`` as ``<case>.nii.gz``; the overlay
    figure of ``nodes.overlay_figure`` (what ``nodes.plot_overlays`` draws per case) saved by the
    catalog's ``FigureDataset`` as ``<case>_overlay.png``. The scan is read once (its ``load`` is
    cached) and the overlay drawn from the scan and labels in memory; the pipeline itself reads the
    scan again for the overlay and the saved mask back for the overlay and the report (lazy
    partitions), which is not timed here, like the input validation of ``nodes.find_scans``.
    Functions are looked up on their modules at call time, so a benchmark can wrap them to time phases.
    """
    import functools  # noqa: PLC0415

    from pancreas_seg import datasets  # noqa: PLC0415
    from pancreas_seg.pipelines.inference import nodes  # noqa: PLC0415
    from pancreas_seg.task07.layout import case_id_from_path  # noqa: PLC0415

    case_id = case_id_from_path(image_path)
    scan = nodes.Scan(str(image_path), functools.cache(functools.partial(nodes.load_nifti, image_path)))
    volume = nodes.segment_scans(predictor, {case_id: scan})[case_id]().labels   # no probability map by default
    datasets.NiftiDataset(filepath=str(output_dir / f"{case_id}.nii.gz")).save(volume)
    figure = nodes.overlay_figure(scan.load(), volume.array, tuple(window_hu), predictor.name, f"{case_id}_overlay")
    datasets.FigureDataset(filepath=str(output_dir / f"{case_id}_overlay.png"), save_args=save_args).save(figure)
    return volume


def phantom_pairs(root: Path, n: int | None = None) -> list[tuple[str, str]]:
    """``[(image_path, label_path), ...]`` of the first ``n`` training cases of a Task07 folder."""
    dataset = json.loads((root / "dataset.json").read_text())
    pairs = [(str(root / e["image"]), str(root / e["label"])) for e in dataset["training"]]
    return pairs if n is None else pairs[:n]


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fit_epoch_seconds(model: Any, *fit_args: Any, **fit_kwargs: Any) -> float:
    """``model.fit(*fit_args, epochs=1, verbose=0, **fit_kwargs)``; returns the epoch's seconds from
    Keras' ``on_epoch_begin`` to ``on_epoch_end`` (the fit call's own set-up left out)."""
    import keras  # noqa: PLC0415 - lazy: most benchmarks import this module without Keras

    span: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            span.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            span.append(time.perf_counter())

    model.fit(*fit_args, epochs=1, verbose=0, callbacks=[EpochTimer()], **fit_kwargs)
    return span[1] - span[0]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def emit_result(result: dict[str, Any]) -> None:
    """Child side: print the result as the last stdout line, with the child's own peak RSS."""
    import psutil  # noqa: PLC0415

    result = {**result, "peak_rss_mib": peak_rss_mib(),
              "final_rss_mib": psutil.Process().memory_info().rss / 2**20}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_variant(module: str, args: Sequence[str], timeout: float = 1800.0,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """Parent side: run ``python -m module *args`` (from the repository root, so ``benchmarks`` is
    importable) in a fresh process and return its result dict.

    ``peak_rss_mib`` is reported by the child from its own ``ru_maxrss`` (the parent's
    RUSAGE_CHILDREN would be the max over *all* children so far, not this one).
    """
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                          check=False)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(args)} failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["subprocess_wall_s"] = wall
    return result


def machine_info() -> dict[str, Any]:
    import psutil  # noqa: PLC0415

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": os.getloadavg()}


def write_report(name: str, payload: dict[str, Any]) -> Path:
    """Write ``data/08_reporting/benchmarks/<name>.json`` and return its path."""
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine_info(), **payload},
                               indent=2, default=float) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Plain fixed-width table on stdout."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
