"""Helpers of ``benchmarks.msd_scale_rehearsal`` and ``benchmarks.preprocessing_throughput``
(``benchmarks._scale``): the MSD-scale phantom settings, the subsets, the process-tree memory
sampler and the summary arithmetic. The benchmarks themselves are not tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _scale
from benchmarks import msd_scale_rehearsal as rehearsal_module
from benchmarks.support.project_copy import DATA_LAYERS, copy_project
from pancreas_seg.imaging.nifti_io import load_nifti
from pancreas_seg.phantoms import PhantomConfig, case_seed, make_phantom, write_synthetic_task07
from pancreas_seg.task07.validation import validate_task07

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = PhantomConfig(shape_xy_px=32, spacing_xy_mm=(9.0, 10.0), slice_thickness_mm=(10.0, 12.0),
                     z_extent_mm=(100.0, 120.0))


@pytest.fixture(scope="module")
def rehearsal():
    """``benchmarks.msd_scale_rehearsal``."""
    return rehearsal_module


@pytest.fixture(scope="module")
def scale():
    """``benchmarks._scale``."""
    return _scale


def test_msd_scale_settings_draw_512_px_and_40_to_150_slices(scale) -> None:
    config = scale.msd_scale_config()
    low, high = scale.SLICE_RANGE
    # the extremes the generator can draw: round(extent / thickness)
    assert round(config.z_extent_mm[0] / config.slice_thickness_mm[1]) == low
    assert round(config.z_extent_mm[1] / config.slice_thickness_mm[0]) == high
    for index in range(2):
        case = make_phantom(case_seed(scale.PHANTOM_SEED, index), config)
        x, y, z = case.hu.shape
        assert (x, y) == (512, 512)
        assert low <= z <= high
        assert 1.5 <= case.meta["spacing_mm"][2] <= 2.5 and 0.6 <= case.meta["spacing_mm"][0] <= 0.98


def test_a_subset_is_the_set_the_generator_writes_for_that_count(scale, tmp_path: Path) -> None:
    full = write_synthetic_task07(tmp_path / "full", 4, 0, TINY, seed=11)
    subset = scale.subset_dataset(full, 3, tmp_path / "subset")
    direct = write_synthetic_task07(tmp_path / "direct", 3, 0, TINY, seed=11)
    assert (subset / "dataset.json").read_text() == (direct / "dataset.json").read_text()
    files = sorted(p.relative_to(subset) for p in subset.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(direct) for p in direct.rglob("*.nii.gz")) and len(files) == 6
    for rel in files:
        assert (subset / rel).read_bytes() == (direct / rel).read_bytes()
        assert os.path.samefile(subset / rel, full / rel)   # hard links: no second copy on disk
    assert validate_task07(subset, 1e-3).findings == []
    assert scale.slice_counts(subset) == [load_nifti(subset / f).array.shape[2] for f in files if "images" in str(f)]
    # hard links are counted once: the subset adds only its dataset.json to the disk used
    added = scale.disk_usage(tmp_path) - scale.disk_usage(tmp_path / "full") - scale.disk_usage(tmp_path / "direct")
    assert added == (subset / "dataset.json").stat().st_blocks * 512
    assert scale.disk_usage(subset) > added
    with pytest.raises(ValueError, match="n <= 4"):
        scale.subset_dataset(full, 5, tmp_path / "too_many")


@pytest.mark.subprocess
def test_ensure_phantoms_takes_a_subset_of_a_larger_set(scale, tmp_path: Path) -> None:
    big = scale.ensure_phantoms(tmp_path, 4, processes=2, progress=False, config=TINY, seed=5)
    assert big == scale.dataset_folder(tmp_path, 4) and big.name == "Task07_Pancreas_phantoms_004"
    small = scale.ensure_phantoms(tmp_path, 3, progress=False, config=TINY, seed=5)
    assert os.path.samefile(small / "imagesTr" / "pancreas_003.nii.gz", big / "imagesTr" / "pancreas_003.nii.gz")
    assert json.loads((small / "dataset.json").read_text())["numTraining"] == 3
    mtime = (small / "dataset.json").stat().st_mtime_ns
    assert scale.ensure_phantoms(tmp_path, 3, progress=False, config=TINY, seed=5) == small  # reused
    assert (small / "dataset.json").stat().st_mtime_ns == mtime
    # 2 cases: the generator stores case 2 LPS (none would be otherwise), so it is generated anew
    assert not scale.first_cases_are_the_smaller_set(4, 2, TINY.non_ras_every)
    two = scale.ensure_phantoms(tmp_path, 2, processes=1, progress=False, config=TINY, seed=5)
    assert not os.path.samefile(two / "imagesTr" / "pancreas_002.nii.gz", big / "imagesTr" / "pancreas_002.nii.gz")
    assert json.loads((two / "dataset.json").read_text())["synthetic"]["cases"][1]["orientation"] == "LPS"
    other_seed = scale.ensure_phantoms(tmp_path / "other", 2, processes=1, progress=False, config=TINY, seed=6)
    assert not os.path.samefile(other_seed / "imagesTr" / "pancreas_001.nii.gz", big / "imagesTr" / "pancreas_001.nii.gz")


@pytest.mark.subprocess
def test_tree_sampler_sees_the_peak_of_a_worker_process(scale, tmp_path: Path) -> None:
    """A child starts a worker process as the LocalCluster does (multiprocessing, spawn) that
    touches 300 MiB for a moment and exits before it is reaped, and a plain subprocess; the sampler
    reports the worker's peak (the kernel's VmHWM), the child's own as the driver's, and the
    subprocess under others."""
    code = ("import json, multiprocessing, subprocess, sys, time\n"
            "def work():\n"
            "    import numpy\n"
            "    a = numpy.ones(300 * 2**20, numpy.uint8)\n"
            "    del a\n"
            "    time.sleep(0.5)\n"
            "if __name__ == '__main__':\n"
            "    p = multiprocessing.get_context('spawn').Process(target=work)\n"
            "    p.start(); time.sleep(3.0); p.join()  # a zombie for a while: its peak must survive\n"
            "    subprocess.run([sys.executable, '-c', 'import time; time.sleep(0.5)'], check=True)\n"
            "    print('" + scale._common.RESULT_PREFIX + "' + json.dumps({'peak_rss_mib': 1.0}))\n")
    script = tmp_path / "child.py"
    script.write_text(code)
    result = scale.run_sampled([str(script)], cwd=tmp_path, log_path=tmp_path / "child.log")
    assert len(result["worker_peak_rss_mib"]) == 1
    assert 300 <= result["worker_peak_rss_mib"][0] < 600
    assert result["driver_peak_rss_mib"] < 300
    assert "multiprocessing.spawn" in result["processes"]["workers"][0]["cmdline"]
    assert result["cpu_s"]["workers"] > 0 and set(result["cpu_s"]) == {"driver", "workers", "others"}
    assert any("time.sleep(0.5)" in p["cmdline"] for p in result["processes"]["others"])


@pytest.mark.subprocess
def test_run_sampled_reports_a_failing_child(scale, tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        scale.run_sampled([str(script)], cwd=tmp_path, log_path=tmp_path / "fails.log")


def test_flatness_ratios(scale) -> None:
    flat = scale.flatness({30: {"wall_s": 60.0, "peak_worker_rss_mib": 500.0},
                           100: {"wall_s": 190.0, "peak_worker_rss_mib": 520.0},
                           281: {"wall_s": 562.0 * 1.1, "peak_worker_rss_mib": 600.0}})
    assert (flat["smallest"], flat["largest"]) == (30, 281)
    assert math.isclose(flat["cost_per_case_ratio"], 1.1) and flat["cost_pass"]
    assert math.isclose(flat["peak_worker_rss_ratio"], 1.2) and not flat["memory_pass"]
    assert not flat["pass"]
    assert math.isclose(flat["wall_per_case_s"][30], 2.0)


def test_throughput_summary_is_the_ratio_of_medians(scale) -> None:
    runs = [{"runner": "sequential", "round": k, "session_run_s": s, "driver_peak_rss_mib": 800.0,
             "worker_peak_rss_mib": []} for k, s in enumerate([60.0, 66.0, 90.0])]
    runs += [{"runner": "dask", "round": k, "session_run_s": s, "driver_peak_rss_mib": 400.0,
              "worker_peak_rss_mib": [w, 500.0]} for k, (s, w) in enumerate([(30.0, 700.0), (40.0, 650.0), (33.0, 900.0)])]
    summary = scale.throughput_summary(runs, 30)
    assert math.isclose(summary["median_cases_per_s_sequential"], 30 / 66.0)
    assert math.isclose(summary["median_cases_per_s_dask"], 30 / 33.0)
    assert math.isclose(summary["speedup"], 2.0) and summary["speedup_pass"]
    assert np.allclose(summary["round_speedups"], [2.0, 66 / 40, 90 / 33])
    assert summary["median_peak_rss_mib_worker"] == 700.0 and summary["memory_pass"]   # max per run, median over runs
    assert summary["pass"]
    with pytest.raises(ValueError):
        scale.throughput_summary(runs[:3], 30)


def test_rehearsal_summary(rehearsal, capsys) -> None:
    def run(n: int, wall: float, cpu: float, workers: list[float]) -> dict:
        return {"n_cases": n, "session_run_s": wall, "cpu_s": {"driver": 1.0, "workers": cpu - 1.0, "others": 0.0},
                "worker_peak_rss_mib": workers, "driver_peak_rss_mib": 300.0,
                "phases_s": {"ingestion": 0.3 * wall, "validation": 0.2 * wall, "planning": 0.2 * wall, "shards": None},
                "disk_bytes": {layer: 1024.0 for layer in ("03_primary", "04_feature", "05_model_input")} | {"total": 3072.0}}

    phantoms = {30: {"slices_total": 2400, "bytes": 2**30}, 281: {"slices_total": 23 * 281 * 4, "bytes": 2**32}}
    runs = [run(30, 60.0, 100.0, [600.0, 580.0]), run(281, 281 * 2.2, 281 * 3.0, [610.0, 660.0]),
            run(30, 66.0, 110.0, [640.0, 600.0])]
    summary, flat = rehearsal.summarise(runs, phantoms, 1.15)
    assert summary[30]["repeats"] == 2 and summary[30]["wall_s"] == 63.0 and summary[30]["wall_per_case_s"] == 2.1
    assert summary[30]["peak_worker_rss_mib"] == 620.0   # the larger worker of each run, median over runs
    phases = summary[30]["phases_s"]
    assert phases["shards"] is None
    assert np.allclose([phases[k] for k in ("ingestion", "validation", "planning")], [18.9, 12.6, 12.6])
    assert math.isclose(flat["cost_per_case_ratio"], 2.2 / 2.1) and flat["cost_pass"]
    assert math.isclose(flat["peak_worker_rss_ratio"], 660.0 / 620.0) and flat["memory_pass"] and flat["pass"]
    assert math.isclose(flat["cpu_per_case_ratio"], 3.0 / (105.0 / 30))
    assert math.isclose(flat["slices_per_case_ratio"], 92 / 80)
    rehearsal.print_summary(summary, flat, phantoms)
    out = capsys.readouterr().out
    assert "cost per case 281 / 30 cases: 1.048 (limit 1.15): PASS" in out
    assert "peak worker RSS 281 / 30 cases: 1.065 (limit 1.15): PASS" in out
    sequential = [dict(r, worker_peak_rss_mib=[]) for r in runs[:1]]   # one process: its own peak
    assert rehearsal.summarise(sequential, phantoms, 1.15) == (rehearsal.summarise(sequential, phantoms, 1.15)[0], None)
    assert rehearsal.summarise(sequential, phantoms, 1.15)[0][30]["peak_worker_rss_mib"] == 300.0


def test_phases_from_a_run_log(scale) -> None:
    log = "\n".join([
        "1000.000 11 INFO kedro.framework.session: Kedro project pancreas_seg",
        "1002.500 12 INFO kedro.pipeline.node: Running node: stage_raw_dataset: stage_raw_dataset([params:ingestion]) -> [raw_task07_root]",
        "1003.000 12 INFO kedro.pipeline.node: Running node: validate_raw_dataset: validate_raw_dataset([x]) -> [y]",
        "   a wrapped continuation line",
        "1013.250 12 INFO kedro.pipeline.node: Running node: apply_invalid_policy: apply_invalid_policy([y]) -> [z]",
        "1020.000 13 INFO kedro.pipeline.node: Running node: fit_intensity_stats: fit_intensity_stats([m]) -> [s]",
        "1021.000 13 INFO kedro.pipeline.node: Running node: preprocess_cases: preprocess_cases([m]) -> [t]",
        "1030.000 14 INFO pancreas_seg.pipelines.preprocessing.nodes: Preprocessing case 1/2: pancreas_001",
        "1035.000 13 INFO pancreas_seg.pipelines.preprocessing.nodes: Preprocessing case 2/2: pancreas_002",
    ])
    phases = scale.log_phases(log, run_start=1001.0, run_end=1041.0)
    assert phases == {"ingestion": 19.0, "to_preprocess_cases": 20.0, "validation": 10.25, "planning": 9.0,
                      "shards": 11.0}
    only_preprocessing = "\n".join(line for line in log.splitlines()[5:])
    assert scale.log_phases(only_preprocessing, 1019.0, 1041.0)["ingestion"] is None


@pytest.mark.subprocess
def test_project_copy_has_conf_and_the_data_skeleton(scale, tmp_path: Path) -> None:
    """The benchmarks' project copy is the tests' one (``benchmarks.support.project_copy``); a child
    in it runs this checkout's ``src/`` and finds the ``benchmarks`` package (``python -m``)."""
    project = copy_project(REPO_ROOT, tmp_path / "project")
    assert (project / "conf" / "base" / "parameters_ingestion.yml").is_file()
    assert (project / "conf" / "msd" / "parameters.yml").is_file()
    assert list((project / "conf" / "local").iterdir()) == []
    assert sorted(p.name for p in (project / "data").iterdir()) == list(DATA_LAYERS)
    assert scale.disk_by_layer(project)["total"] == 0
    env = scale.child_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT / "src")
    code = "import pancreas_seg, benchmarks._scale as s; print(pancreas_seg.__file__); print(s.__file__)"
    completed = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                               check=True)
    package, scale_file = completed.stdout.split()
    assert package.startswith(str(REPO_ROOT / "src"))
    assert scale_file == str(REPO_ROOT / "benchmarks" / "_scale.py")
