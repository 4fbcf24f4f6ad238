"""Tumour detection on phantoms no model has seen: more tumours than the 5-patient test split holds.

Why
---
The default test split has 5 phantoms, and with the default seed only one of them has a tumour. A
tumour Dice or a lesion sensitivity over one case says little. This script draws ``--n`` new
phantoms with the default generator settings (``conf/base/parameters_ingestion.yml``) but another
seed (``--seed``), so they are new anatomy from the same distribution. Every one gets a tumour by
default (``--tumour-probability 1``); the tumour-free cases of the test split already show false
alarms. The script segments them with the trained models as the inference pipeline does
(:class:`pancreas_seg.inference.predictor.Predictor`: ``Predictor.from_reference`` with the
``inference`` settings, then ``Predictor.segment``; the same preprocessing, cascade and checks).
It scores them with the evaluation's own metrics.

Train first (``kedro run --pipelines=train``), then, from the repository root:

    .venv/bin/python -m benchmarks.extra_phantoms_check                      # cascade and unet, 20 phantoms
    .venv/bin/python -m benchmarks.extra_phantoms_check --models cascade --n 40 --seed 9

Prints per model: pancreas Dice, tumour Dice over the cases with a tumour, lesion sensitivity
(found / true) and false-positive tumour components per case. Writes
``data/08_reporting/benchmarks/extra_phantoms_check.json``. The phantoms are SYNTHETIC.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import yaml

from benchmarks import _common


def phantom_config(tumour_probability: float):
    """The generator settings of conf/base, with ``tumour_probability`` replaced."""
    from pancreas_seg.phantoms import PhantomConfig  # noqa: PLC0415

    params = yaml.safe_load((_common.REPO_ROOT / "conf" / "base" / "parameters_ingestion.yml").read_text())
    phantom = dict(params["ingestion"]["synthetic"]["phantom"])
    phantom.pop("non_ras_every", None)
    phantom.pop("tumour_fraction", None)   # each phantom draws its tumour with tumour_probability
    phantom["tumour_probability"] = tumour_probability
    return PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in phantom.items()})


def inference_settings() -> dict:
    return yaml.safe_load((_common.REPO_ROOT / "conf" / "base" / "parameters_inference.yml").read_text())["inference"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cascade", "unet"])
    parser.add_argument("--models-dir", default=str(_common.REPO_ROOT / "data" / "06_models"))
    parser.add_argument("--n", type=int, default=20, help="phantoms to draw")
    parser.add_argument("--seed", type=int, default=7070, help="generator seed (the default data set uses 2026)")
    parser.add_argument("--tumour-probability", type=float, default=1.0)
    args = parser.parse_args()

    from pancreas_seg.evaluation.metrics import (  # noqa: PLC0415
        case_metrics,
        lesion_detection,
        summarise,
        summarise_lesions,
    )
    from pancreas_seg.inference.predictor import PredictionSettings, Predictor  # noqa: PLC0415
    from pancreas_seg.phantoms import case_seed, make_phantom  # noqa: PLC0415

    config = phantom_config(args.tumour_probability)
    cases = []
    for index in range(args.n):
        case = make_phantom(case_seed(args.seed, index), config, store_non_ras=index % 3 == 2)
        cases.append((f"extra_{index + 1:03d}", case))
        print(f"drew phantom {index + 1}/{args.n}", flush=True)
    settings = PredictionSettings.from_params(inference_settings())
    report = {"seed": args.seed, "n": args.n, "tumour_probability": args.tumour_probability,
              "models": {}, "machine": _common.machine_info()}
    rows = []
    for name in args.models:
        predictor = Predictor.from_reference(name, args.models_dir, settings)
        per_case, seconds = [], []
        for index, (case_id, case) in enumerate(cases, start=1):
            start = time.perf_counter()
            labels = predictor.segment(case.hu, case.affine, case_id)
            seconds.append(time.perf_counter() - start)
            spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
            scores = {row["class"]: row["dice"] for row in case_metrics(labels, case.label, spacing, 2.0)}
            lesions = lesion_detection(labels, case.label)
            per_case.append({"case_id": case_id, "dice_pancreas": scores["pancreas"], "dice_tumour": scores["tumour"],
                             "tumour_present": bool((case.label == 2).any()), **lesions})
            print(f"[{name}] {index}/{args.n} {case_id}: pancreas {scores['pancreas']:.3f}, tumour "
                  f"{scores['tumour']:.3f}, lesions {lesions['lesions_found']}/{lesions['lesions_true']}, "
                  f"FP {lesions['fp_components']}", flush=True)
        pancreas = summarise(c["dice_pancreas"] for c in per_case)
        tumour = summarise(c["dice_tumour"] for c in per_case if c["tumour_present"])
        lesions = summarise_lesions(per_case)
        model_files = [str(path) for path in predictor.model_files]
        report["models"][name] = {"model_file": model_files[0] if len(model_files) == 1 else model_files,
                                  "version": predictor.card.version, "settings": settings.to_dict(),
                                  "pancreas_dice": pancreas, "tumour_dice_cases_with_tumour": tumour,
                                  "lesions": lesions, "seconds_per_case_median": _common.median(seconds),
                                  "cases": per_case}
        rows.append([name, f"{pancreas['mean']:.3f} ± {pancreas['std']:.3f}",
                     f"{tumour['mean']:.3f} ± {tumour['std']:.3f} (n={tumour['n']})",
                     f"{lesions['lesion_sensitivity']:.3f} ({lesions['lesions_found']}/{lesions['lesions_true']})",
                     f"{lesions['fp_components_per_case']:.2f}", f"{_common.median(seconds):.1f}"])
    _common.print_table(["model", "pancreas Dice", "tumour Dice (cases with tumour)", "lesion sensitivity",
                         "FP comp./case", "s/case"], rows)
    print(f"report: {_common.write_report('extra_phantoms_check', report)}")


if __name__ == "__main__":
    main()
