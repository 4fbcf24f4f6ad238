"""Inference seconds per volume: the inference node's per-case code end to end, per model.

What it measures
----------------
One SYNTHETIC 512 x 512 x ~100 phantom (case ``pancreas_001`` of the cached set under
``data/01_raw/benchmark_phantoms_512/``, written on first use; a data set of its own, seed 512,
not the phantoms the models are trained on) is segmented from file to files by the code
``kedro run --pipelines=inference`` runs for every scan: ``Predictor.from_trained`` (load the
``.keras`` file(s), check them against the model card, XLA; what the ``load_predictor`` node does)
once, then per scan ``_common.segment_case``: the scan as a ``nodes.Scan``, read and segmented by
the lazy partition of ``nodes.segment_scans`` (``Predictor.segment``), ``<case>.nii.gz`` written by
the catalog's ``NiftiDataset``, the overlay figure of ``nodes.overlay_figure`` written by the
catalog's ``FigureDataset`` (``save_args`` of ``inference_overlays`` in ``conf/base/catalog.yml``).
The scan is read once; the pipeline's second read of it and its reads of the saved mask (the
overlay and report nodes load the partitions back) are not timed, nor is the input validation of
``nodes.find_scans``. The ``inference`` settings (batch size, XLA, TTA, postprocessing) are those
of ``conf/base/parameters_inference.yml`` (``PredictionSettings.from_params``); ``--batch-size``
and ``--no-xla`` override them.

Single-stage models, 256 x 256 input with the preprocessing of
``conf/base/parameters_preprocessing.yml`` (``crop_to_body``) except the size; segmenting is
``Predictor.segment`` (preprocessing, slice-wise ``predict_on_batch``, labels back onto the
512 x 512 x Z grid). Untrained weights (timing does not depend on them; label_mode multiclass):
``unet`` with base_filters 32 and depth 4 (the study's width, ``conf/msd``), ``unet_b16`` (the
U-Net width of ``conf/base/parameters_training.yml``: 16, depth 4); ``unet_small`` (16, depth 2),
``fcn`` (16, depth 5) and ``vnet2d`` (16, depth 4). Untrained weights predict foreground on every
slice, so the restore step interpolates every slice: a worst case (a trained model skips the
slices that are background everywhere).

``cascade``: the coarse-to-fine cascade through the same ``Predictor.segment`` (its
``inference.cascade.predict_cascade`` and ``merge_stages``) as ``kedro run --pipelines=inference --params
inference.model=cascade``. Stage 1 is the newest TRAINED
``unet`` under ``--models-dir`` (``<models-dir>/unet/model.keras/<version>/``, with the model card of
that version; the ``conf/base`` U-Net: base 16, depth 4, 96 px body-framed slices), because an
untrained stage 1 finds nothing or everything and the timing would not be representative. The
variant fails with the path and the training command when there is none. Stage 2 is an UNTRAINED
study-width U-Net (base 32, depth 4) with ``conf/msd``'s crop (``cascade.crop`` of
``conf/base/parameters_cascade.yml`` overlaid with ``conf/msd/parameters.yml``: 1 mm pixels,
160 x 224 px tiles, 15 mm in-plane and 10 mm slice margins, tile overlap 0.25). An untrained
stage 2 predicts foreground everywhere in its crop, so its restore step (and the mask written) is a
worst case; the trained stage 1 decides where the crop is and how many slices and tiles stage 2
runs on, which is what the time depends on. The variant fails when stage 1 finds no pancreas.

Each model is built, saved to a temporary ``.keras`` file with a ``ModelCard`` bound to its weights,
and handed to ``Predictor.from_trained`` as a ``TrainedModel`` (safe-mode load, card checks, XLA), as
inference does. Each variant runs in its own fresh subprocess (own peak RSS). Single-stage: a
warm-up call on a short volume with ``batch + Z % batch`` slices traces (and XLA-compiles) the one
padded batch shape. Cascade: the warm-up is one whole case (its two models have one batch shape
each, and stage 1 must find the pancreas before stage 2 runs). That one-off cost is reported as
``warm-up``; then ``--repeats`` whole cases are timed (median reported). The stages are timed
inside the same calls by wrapping the functions the nodes, the catalog datasets, the predictor
(``inference.predictor``) and the cascade (``inference.cascade``) look up on their modules:

* single-stage: ``read`` (``nodes.load_nifti``), ``preprocess`` (``preprocess_image``), ``predict``
  (``forward.predict_slices``), ``restore`` (``forward.to_file_grid``), ``write_mask``
  (``NiftiDataset.save``), ``overlay_png`` (``nodes.overlay_figure`` + ``FigureDataset.save``);
  ``segment`` = preprocess + predict + restore; ``other`` = the rest of the ``Predictor.segment``
  call (the members' mean, post-processing);
* cascade: ``read``; ``stage1`` (body-framed preprocessing + predict + labels); ``locate`` (the
  pancreas box and the crop plan); ``crop_preprocess``; ``stage2_predict`` (every tile, with the
  number of slices and tiles); ``restore`` (``full_model_grid`` + ``forward.to_file_grid``);
  ``write_mask``, ``overlay_png``; ``segment`` = the whole ``Predictor.segment`` call. Also the
  slices stage 2 ran on against the scan's.

Targets: single-stage U-Net at 256 x 256 <= 30 s per volume on 2 cores; the cascade with a
study-width stage 2 <= 10 s per volume. Both are checked on the end-to-end median (file in, files
out). The machines are noisy, so the run also reports the ratio cascade / ``unet`` (study width,
256 px) of the medians measured in the same run: run ``--archs unet cascade`` for it, best with
``--rounds 2`` or more, which runs the variants' subprocesses in turn (unet, cascade, unet, ...) so
that a change of load in the middle of the run hits both, and takes medians over all rounds.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.inference_benchmark                       # all 6, 3 repeats
    .venv/bin/python -m benchmarks.inference_benchmark --archs unet cascade --repeats 3 --rounds 2  # the ratio
    .venv/bin/python -m benchmarks.inference_benchmark --archs cascade --models-dir /other/data/06_models
    .venv/bin/python -m benchmarks.inference_benchmark --archs unet unet_b16 --repeats 5
    .venv/bin/python -m benchmarks.inference_benchmark --archs unet --batch-size 16   # padding cost
    .venv/bin/python -m benchmarks.inference_benchmark --archs unet --no-xla   # without XLA
    .venv/bin/python -m benchmarks.inference_benchmark --archs unet --retain-heap   # allocator experiment
    .venv/bin/python -m benchmarks.inference_benchmark --variant unet        # one child by hand

Without ``--archs`` the cascade is skipped (with a note) when no trained stage 1 exists; asked for
explicitly, it fails, naming the path and ``kedro run --pipelines=train_unet``.

Results: ``data/08_reporting/benchmarks/inference_benchmark.json`` and tables on stdout.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common

SIZE = (256, 256)
STAGES = ("read", "preprocess", "predict", "restore", "write_mask", "overlay_png")  # in order
CASCADE_STAGES = ("read", "stage1", "locate", "crop_preprocess", "stage2_predict", "restore",
                  "write_mask", "overlay_png")  # in order
ARCHS = {  # the study's U-Net width; the others at their conf/base widths, V-Net at conf/msd's 16 (base: 8)
    "unet": {"base_filters": 32, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
    "unet_b16": {"base_filters": 16, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},  # conf/base width
    "unet_small": {"base_filters": 16, "depth": 2, "dropout": 0.1, "l2_weight": 1e-4},
    "fcn": {"base_filters": 16, "depth": 5, "dropout": 0.1, "l2_weight": 1e-4},
    "vnet2d": {"base_filters": 16, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
}
CASCADE = "cascade"
CASCADE_STAGE2 = ("unet", ARCHS["unet"])  # the study's width, as conf/msd's cascade.stage2
VARIANTS = (*ARCHS, CASCADE)
DEFAULT_MODELS_DIR = _common.REPO_ROOT / "data" / "06_models"
CASCADE_TARGET_S = 10.0
UNET_TARGET_S = 30.0


def inference_settings(batch_size: int | None, xla: bool) -> dict:
    """``conf/base/parameters_inference.yml``'s ``inference`` block, as the pipeline gets it."""
    return _common.inference_settings(batch_size, xla)


def single_stage_preprocessing() -> dict[str, Any]:
    """``conf/base``'s ``preprocessing`` (``crop_to_body``, window) at the 256 px input."""
    return _common.single_stage_preprocessing(SIZE)


def cascade_crop_settings() -> dict[str, Any]:
    """``cascade.crop`` of conf/base overlaid with conf/msd (as ``--env msd`` gives it: the soft merge)."""
    from pancreas_seg.learning.setup import merge_settings  # noqa: PLC0415

    base = _common.conf("base", "parameters_cascade.yml")["cascade"]["crop"]
    return merge_settings(base, _common.conf("msd", "parameters.yml").get("cascade", {}).get("crop", {}))


def find_stage1(models_dir: Path, version: str | None = None) -> Any:
    """The newest trained cascade stage 1 with its card, or SystemExit naming path and command.

    ``version``: the one the parent found; a newer one appearing during the run (a training job
    finishing) would change what stage 2 runs on, so the child refuses it.
    """
    from pancreas_seg.inference.model_store import latest_trained_model  # noqa: PLC0415 - no Keras
    from pancreas_seg.models.names import CASCADE_STAGE1  # noqa: PLC0415

    try:
        stage1 = latest_trained_model(models_dir, CASCADE_STAGE1)
    except FileNotFoundError as error:
        raise SystemExit(
            f"The cascade variant needs a TRAINED stage 1 (an untrained one finds no pancreas or all of "
            f"it, so the timing would mean nothing): {error} (conf/base), or point --models-dir at a "
            "data/06_models folder that has one.") from None
    if version is not None and stage1.card.version != version:
        raise SystemExit(f"the newest stage 1 under {models_dir} changed during the run ({version} -> "
                         f"{stage1.card.version}): rerun the benchmark")
    return stage1


def single_stage_model(arch: str, folder: Path) -> tuple[Any, dict[str, Any]]:
    """A ``TrainedModel`` of an untrained ``arch`` at 256 px with a card bound to its weights."""
    return _common.untrained_single_stage_model(arch.removesuffix("_b16"), ARCHS[arch], SIZE,
                                                folder / f"{arch}.keras")


def cascade_model(models_dir: Path, folder: Path, stage1_version: str | None) -> tuple[Any, dict[str, Any]]:
    """The cascade ``TrainedModel``: the trained stage 1 + an untrained study-width stage 2 + card."""
    from pancreas_seg.cascade.crops import CropConfig  # noqa: PLC0415
    from pancreas_seg.inference.model_card import CascadeSpec, ModelCard  # noqa: PLC0415
    from pancreas_seg.inference.model_store import TrainedModel  # noqa: PLC0415
    from pancreas_seg.models.names import CASCADE_NAME  # noqa: PLC0415

    stage1 = find_stage1(models_dir, stage1_version)
    card1 = stage1.card
    crop = CropConfig.from_params(cascade_crop_settings())
    input_shape = (*crop.size_px, card1.preprocessing_config.context_slices)
    name, settings = CASCADE_STAGE2
    path = folder / "stage2.keras"
    params, sha = _common.save_untrained(name, input_shape, settings, path)
    stage1_facts = {"architecture": card1.architecture, "label_mode": card1.label_mode,
                    "input_shape": list(card1.input_shape), "trained_at": card1.trained_at,
                    "weights_sha256": card1.weights_sha256, "version": card1.version}
    spec = CascadeSpec(stage1=stage1_facts, crop=crop.to_dict(),
                       stage2={"architecture": name, "label_mode": "multiclass", "input_shape": list(input_shape)})
    card = ModelCard.for_trained_model(CASCADE_NAME, "multiclass", card1.preprocessing, card1.intensity_stats,
                                       card1.dataset, card1.cases, sha, input_shape=input_shape,
                                       version="benchmark (stage 2 untrained)", cascade=spec)
    info = {"params": params, "model_settings": {"stage2": settings}, "crop": crop.to_dict(),
            "stage1": {"model_file": str(stage1.model_file), **stage1_facts,
                       "best_value": card1.best_value, "monitor": card1.monitor}}
    return TrainedModel(path, card, stage1.model_file), info


class StageTimers:
    """Seconds per stage of one case, by wrapping the module-level names the pipeline's code looks up.

    Also records what ``use_xla`` returned, the cascade's reports (from ``predict_cascade``)
    and the slices of every stage-2 tile prediction.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.xla: list[bool] = []
        self.reports: list[dict[str, Any]] = []
        self.stage2_tile_slices: list[int] = []
        self._in_stage2 = False

    def clear(self) -> None:
        self.seconds.clear()
        self.stage2_tile_slices.clear()

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    def install(self, nodes, datasets, predictor, cascade_module, crops, cascade: bool) -> None:
        """Wrap the functions of ``nodes`` (``pipelines.inference.nodes``), ``datasets``
        (``pancreas_seg.datasets``), ``predictor`` (``inference.predictor``), ``cascade_module``
        (``inference.cascade``) and ``crops`` (``cascade.crops``); before the predictor is built."""
        def recorded_xla(*args, **kwargs):
            self.xla.append(use_xla(*args, **kwargs))
            return self.xla[-1]

        use_xla = predictor.use_xla
        predictor.use_xla = recorded_xla
        nodes.load_nifti = self.timed("read", nodes.load_nifti)
        datasets.NiftiDataset.save = self.timed("write_mask", datasets.NiftiDataset.save)
        nodes.overlay_figure = self.timed("overlay_png", nodes.overlay_figure)
        datasets.FigureDataset.save = self.timed("overlay_png", datasets.FigureDataset.save)
        predictor.to_file_grid = self.timed("restore", predictor.to_file_grid)
        if not cascade:
            predictor.preprocess_image = self.timed("preprocess", predictor.preprocess_image)
            predictor.predict_slices = self.timed("predict", predictor.predict_slices)
            return
        predict_slices, predict_tiled = cascade_module.predict_slices, cascade_module.predict_tiled
        predict_cascade = predictor.predict_cascade
        stage1_predict = self.timed("stage1", predict_slices)

        def stage_predict(model, image_slices, *args, **kwargs):  # stage 1, or one stage-2 tile
            if self._in_stage2:
                self.stage2_tile_slices.append(int(image_slices.shape[0]))
                return predict_slices(model, image_slices, *args, **kwargs)
            return stage1_predict(model, image_slices, *args, **kwargs)

        def tiled(*args, **kwargs):
            self._in_stage2 = True
            try:
                return predict_tiled(*args, **kwargs)
            finally:
                self._in_stage2 = False

        def with_report(*args, **kwargs):
            outputs, report = predict_cascade(*args, **kwargs)
            self.reports.append(report)   # the predictor completes it after this call returns
            return outputs, report

        cascade_module.preprocess_image = self.timed("stage1", cascade_module.preprocess_image)
        cascade_module.predict_slices = stage_predict
        cascade_module.probabilities_to_labels = self.timed("stage1", cascade_module.probabilities_to_labels)
        cascade_module.locate_pancreas = self.timed("locate", cascade_module.locate_pancreas)
        crops.CropGeometry.plan = staticmethod(self.timed("locate", crops.CropGeometry.plan))  # bound classmethod
        cascade_module.preprocess_crop_image = self.timed("crop_preprocess", cascade_module.preprocess_crop_image)
        cascade_module.predict_tiled = self.timed("stage2_predict", tiled)
        crops.CropGeometry.full_model_grid = self.timed("restore", crops.CropGeometry.full_model_grid)
        predictor.predict_cascade = with_report   # Predictor.segment_with_report looks it up there


def child(variant: str, repeats: int, case_index: int, settings: dict, models_dir: Path,
          retain_heap: bool = False, stage1_version: str | None = None) -> None:
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from pancreas_seg import datasets  # noqa: PLC0415
    from pancreas_seg.cascade import crops  # noqa: PLC0415
    from pancreas_seg.core.labels import PANCREAS, TUMOUR  # noqa: PLC0415
    from pancreas_seg.core.runtime import retained_heap  # noqa: PLC0415
    from pancreas_seg.inference import cascade as cascade_module  # noqa: PLC0415
    from pancreas_seg.inference import predictor as predictor_module  # noqa: PLC0415
    from pancreas_seg.pipelines.inference import nodes  # noqa: PLC0415

    rss_after_imports = _common.peak_rss_mib()
    keras.utils.set_random_seed(0)
    image_path = Path(_common.phantom_pairs(_common.PHANTOM_ROOT)[case_index][0])
    batch = int(settings["batch_size"])
    cascade = variant == CASCADE

    timers = StageTimers()
    timers.install(nodes, datasets, predictor_module, cascade_module, crops, cascade)
    stage_times = timers.seconds

    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        trained, info = (cascade_model(models_dir, Path(tmp), stage1_version) if cascade
                         else single_stage_model(variant, Path(tmp)))
        keras.backend.clear_session()
        t0 = time.perf_counter()   # the load_predictor node's loading and checks
        predictor = predictor_module.Predictor.from_trained(
            trained, predictor_module.PredictionSettings.from_params(settings))
        load_s = time.perf_counter() - t0
    predictor.segment = timers.timed("segment", predictor.segment)   # what segment_scans calls

    ct = nodes.load_nifti(image_path)
    n_z = ct.array.shape[2]
    warm_z = n_z if cascade else batch + n_z % batch
    t0 = time.perf_counter()
    predictor.segment(ct.array[:, :, :warm_z], ct.affine, "warmup")
    warmup_s = time.perf_counter() - t0
    del ct
    if cascade and not timers.reports[-1]["stage1_found"]:
        raise SystemExit(f"stage 1 ({info['stage1']['model_file']}) found no pancreas on {image_path}: the "
                         "cascade would stop after stage 1 and its timing would not be representative")

    runs = []
    window_hu, save_args = settings["overlay_window_hu"], _common.overlay_save_args()
    with tempfile.TemporaryDirectory(prefix="bench_infer_out_") as out_dir:
        for _ in range(repeats):
            timers.clear()
            t0 = time.perf_counter()
            with retained_heap(retain_heap):
                labels = _common.segment_case(predictor, image_path, Path(out_dir), window_hu, save_args).array
            total = time.perf_counter() - t0
            assert labels.shape[2] == n_z
            run = {"total_s": total, **dict(stage_times)}
            if cascade:
                report = timers.reports[-1]
                inner = sum(stage_times.get(k, 0.0) for k in CASCADE_STAGES[1:6])
                run |= {"segment_other_s": stage_times["segment"] - inner,
                        "stage2_slices": report["stage2_slices"], "stage2_tiles": report.get("stage2_tiles", 0),
                        "stage2_forward_slices": sum(-(-n // batch) * batch for n in timers.stage2_tile_slices)}
            else:
                run["segment_s"] = stage_times["preprocess"] + stage_times["predict"] + stage_times["restore"]
                run["segment_other_s"] = stage_times["segment"] - run["segment_s"]
            run |= {"voxels_pancreas": int(np.count_nonzero(labels == PANCREAS)),   # as report_inference counts
                    "voxels_tumour": int(np.count_nonzero(labels == TUMOUR))}
            runs.append(run)
    med = {k: _common.median([r[k] for r in runs]) for k in runs[0]}
    result = {
        "arch": variant, **info, "case": image_path.name,
        "volume_shape": list(labels.shape), "slices": n_z, "batch_size": batch,
        "padded_slices": -n_z % batch, "load_model_s": load_s,
        "warmup_s": warmup_s, "warmup_slices": warm_z, "runs": runs, "median": med,
        "seconds_per_volume": med["total_s"], "slices_per_s": n_z / med["total_s"],
        "rss_after_imports_mib": rss_after_imports, "xla": all(timers.xla) and bool(timers.xla),
        "retain_heap": retain_heap, "keras_backend": keras.backend.backend()}
    if cascade:
        report = timers.reports[-1]
        result["cascade_report"] = {**report, "scan_slices": n_z}
    _common.emit_result(result)


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's results of several fresh subprocesses: medians over all their timed cases."""
    if len(rounds) == 1:
        return rounds[0]
    runs = [run for r in rounds for run in r["runs"]]
    median = {k: _common.median([run[k] for run in runs]) for k in runs[0]}
    return {**rounds[-1], "runs": runs, "median": median, "seconds_per_volume": median["total_s"],
            "slices_per_s": rounds[-1]["slices"] / median["total_s"],
            "warmup_s": _common.median([r["warmup_s"] for r in rounds]),
            "load_model_s": _common.median([r["load_model_s"] for r in rounds]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds), "rounds": len(rounds)}


def parent(args: argparse.Namespace) -> None:
    archs = list(args.archs) if args.archs else list(VARIANTS)
    stage1_version = None
    if CASCADE in archs:
        try:   # asked for: fail now, before minutes of other variants
            stage1_version = find_stage1(args.models_dir).card.version
        except SystemExit:
            if args.archs:
                raise
            archs.remove(CASCADE)
            print(f"note: no trained stage 1 under {args.models_dir}; the cascade variant is skipped "
                  "(train it with `kedro run --pipelines=train_unet`)", flush=True)
    _common.ensure_phantoms_512()
    module = __spec__.name   # this module (also as __main__): each variant runs it with python -m
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    settings = inference_settings(args.batch_size, args.xla)
    t_start = time.perf_counter()
    per_arch: dict[str, list[dict[str, Any]]] = {arch: [] for arch in archs}
    for round_index in range(args.rounds):   # interleaved: a load change hits every variant alike
        for arch in archs:
            r = _common.run_variant(module, ["--variant", arch, "--repeats", str(args.repeats),
                                             "--case-index", str(args.case_index),
                                             "--batch-size", str(settings["batch_size"]),
                                             "--models-dir", str(args.models_dir),
                                             *(["--stage1-version", stage1_version] if stage1_version else []),
                                             *([] if args.xla else ["--no-xla"]),
                                             *(["--retain-heap"] if args.retain_heap else [])],
                                    env=env, timeout=3600)
            per_arch[arch].append(r)
            print(f"  {arch:<10}: {r['seconds_per_volume']:7.2f} s/volume end to end "
                  f"({r['slices_per_s']:.2f} slices/s), runs {[round(x['total_s'], 1) for x in r['runs']]}, "
                  f"XLA {r['xla']}, warm-up {r['warmup_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
                  + (f"  [round {round_index + 1}/{args.rounds}]" if args.rounds > 1 else ""), flush=True)
    results = [merge_rounds(per_arch[arch]) for arch in archs]
    single = [r for r in results if r["arch"] != CASCADE]
    if single:
        rows = []
        for r in single:
            m = r["median"]
            rows.append([r["arch"], f"{r['params'] / 1e6:.2f}M", f"{r['slices']}+{r['padded_slices']}",
                         round(m["total_s"], 2), round(r["slices_per_s"], 2), round(m["segment_s"], 2),
                         *(round(m[k], 2) for k in STAGES), round(m["segment_other_s"], 2),
                         round(r["warmup_s"], 1), round(r["peak_rss_mib"])])
        print()
        _common.print_table(["arch", "params", "slices+padding", "s/volume", "slices/s", "segment s",
                             *(f"{k} s" for k in STAGES), "other s", "compile s", "peak RSS MiB"], rows)
    checks: dict[str, Any] = {}
    for key, label in (("unet", "U-Net, the study's width (base 32, depth 4)"),
                       ("unet_b16", "U-Net, conf/base width (base 16, depth 4)")):
        unet = next((r for r in results if r["arch"] == key), None)
        if unet is not None:
            checks[f"{key}_256_le_30s_per_volume"] = unet["seconds_per_volume"] <= UNET_TARGET_S
            print(f"\n{label} at 256 px: {unet['seconds_per_volume']:.1f} s per volume, read to files "
                  f"-> {'PASS' if checks[f'{key}_256_le_30s_per_volume'] else 'FAIL'} (target <= 30 s)")
    cascade = next((r for r in results if r["arch"] == CASCADE), None)
    if cascade is not None:
        m, rep, s1 = cascade["median"], cascade["cascade_report"], cascade["stage1"]
        print(f"\nCascade: stage 1 = trained {s1['architecture']} {s1['input_shape']} ({s1['model_file']}, "
              f"{s1.get('monitor')} {s1.get('best_value')}); stage 2 = UNTRAINED study-width U-Net "
              f"{cascade['model_settings']['stage2']['base_filters']}/{cascade['model_settings']['stage2']['depth']} "
              f"({cascade['params'] / 1e6:.2f}M), crop {cascade['crop']}")
        print()
        _common.print_table(["arch", "s/volume", "segment s", *(f"{k} s" for k in CASCADE_STAGES), "other s",
                             "stage-2 slices / scan", "tiles", "region px", "warm-up s", "peak RSS MiB"],
                            [[CASCADE, round(m["total_s"], 2), round(m["segment"], 2),
                              *(round(m.get(k, 0.0), 2) for k in CASCADE_STAGES), round(m["segment_other_s"], 2),
                              f"{rep['stage2_slices']} / {rep['scan_slices']}", rep.get("stage2_tiles", 0),
                              "x".join(str(v) for v in rep.get("stage2_region_hw", [])),
                              round(cascade["warmup_s"], 1), round(cascade["peak_rss_mib"])]])
        print(f"stage 1 box (canonical z0, z1, h0, h1, w0, w1): {rep.get('stage1_box')}; stage 2 predicted "
              f"{m['stage2_forward_slices']:.0f} tile slices incl. batch padding. The untrained stage 2 marks "
              f"its crop as foreground ({m['voxels_pancreas'] + m['voxels_tumour']:.0f} voxels), so restore "
              "and the written mask are a worst case.")
        checks["cascade_le_10s_per_volume"] = cascade["seconds_per_volume"] <= CASCADE_TARGET_S
        print(f"\nCascade (study-width stage 2): {cascade['seconds_per_volume']:.2f} s per volume, read to files "
              f"-> {'PASS' if checks['cascade_le_10s_per_volume'] else 'FAIL'} (target <= 10 s)")
        unet = next((r for r in results if r["arch"] == "unet"), None)
        if unet is not None:
            ratio = cascade["seconds_per_volume"] / unet["seconds_per_volume"]
            checks["cascade_over_unet"] = ratio
            print(f"Ratio cascade / unet (study width, 256 px), medians of this run: {ratio:.2f} "
                  f"({cascade['seconds_per_volume']:.2f} s / {unet['seconds_per_volume']:.2f} s); "
                  f"10 s is {CASCADE_TARGET_S / unet['seconds_per_volume']:.2f} of this run's unet")
    path = _common.write_report("inference_benchmark", {
        "settings": {"archs": archs, "repeats": args.repeats, "rounds": args.rounds, "image_size_px": SIZE, "inference": settings,
                     "retain_heap": args.retain_heap, "crop_to_body": True, "case_index": args.case_index,
                     "models_dir": str(args.models_dir)},
        "results": results, "checks": checks, "total_wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path}  (total {time.perf_counter() - t_start:.0f} s, load average now "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="child mode: one model")
    parser.add_argument("--archs", nargs="+", choices=VARIANTS, default=None,
                        help=f"models to time (default: all; {CASCADE} only when a trained stage 1 exists)")
    parser.add_argument("--repeats", type=int, default=3, help="timed cases per subprocess")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh subprocesses per variant, interleaved (unet, cascade, unet, ...); "
                             "medians over all rounds' cases")
    parser.add_argument("--case-index", type=int, default=0, help="which cached phantom (0 = pancreas_001)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help="where the cascade's trained stage 1 is looked up (<dir>/unet/model.keras/<version>/); "
                             "default: this repository's data/06_models")
    parser.add_argument("--stage1-version", default=None, help=argparse.SUPPRESS)  # parent -> child
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slices per forward pass (default: inference.batch_size of conf/base)")
    parser.add_argument("--no-xla", dest="xla", action="store_false", help="predict without XLA (inference.xla: false)")
    parser.add_argument("--retain-heap", action="store_true",
                        help="run each case inside pancreas_seg.core.runtime.retained_heap (not what inference does)")
    args = parser.parse_args()
    if min(args.repeats, args.rounds) < 1:
        parser.error("--repeats and --rounds must be >= 1")
    if args.variant is None:
        parent(args)
    else:
        child(args.variant, args.repeats, args.case_index, inference_settings(args.batch_size, args.xla),
              args.models_dir, args.retain_heap, args.stage1_version)


if __name__ == "__main__":
    main()
