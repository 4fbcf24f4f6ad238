"""Serving seconds per scan: one 512 x 512 x ~100 CT through the MLflow endpoint vs. the inference node.

What it measures
----------------
The target (issue #13): serving one scan through ``mlflow models serve`` takes at most 1.2 x the
inference node's time on the same scan. Both are timed in the SAME invocation, interleaved in rounds,
so that a change of load on the (shared, 2-core) machine hits both alike, and the check is on the
ratio of their medians.

The scan: the SYNTHETIC 512 x 512 x ~100 phantom ``pancreas_001`` of the cached set under
``data/01_raw/benchmark_phantoms_512/`` (``_common.ensure_phantoms_512``), the one
``inference_benchmark.py`` times.

The model: an UNTRAINED U-Net built with the ``conf/base`` settings (``training.model``: base 16,
depth 4, dropout, L2; ``--base-filters 32`` gives the study's width) at 256 x 256 input
(``--image-size``; ``conf/base`` itself trains at 96 px), with ``conf/base``'s preprocessing
(``crop_to_body``). It is saved as ``.keras`` with a model card bound to its weights
(``_common.untrained_single_stage_model``, as the inference benchmark does), and that
``TrainedModel`` is used on both sides. Untrained weights predict foreground on every slice, so the
mask is a worst case for restore and writing, the same on both sides.

(a) ``node``: the inference pipeline's per-scan work in this process:
    ``_common.segment_case(Predictor.from_trained(trained, settings), path, out_dir, ...)``: the scan
    read and segmented by ``nodes.segment_scans``, ``<case>.nii.gz`` and the overlay PNG written by
    the catalog's datasets (see ``_common.segment_case``; the inference benchmark times the same
    call). Settings: ``conf/base``'s ``inference`` block (batch 4, no TTA, no largest-component,
    XLA) as ``PredictionSettings``. The model is loaded once and one warm-up call (the whole scan;
    XLA compile) is made before timing. The input validation of ``nodes.find_scans`` (one more read of
    the scan) and the pipeline's reads of the saved mask are NOT in this time.
(b) ``served``: the model is logged with ``pancreas_seg.inference.serving.log_segmentation_model`` and
    the same ``PredictionSettings`` (the pyfunc applies the settings recorded in its bundle) into a
    temporary sqlite MLflow store (its artifacts in the same temporary folder), served with
    ``mlflow models serve -m models:/m-... --env-manager local -h 127.0.0.1 -p <free port>`` in a
    subprocess (the project's venv, ``/ping`` awaited), and one scan is one HTTP request, timed on
    the client from reading the ``.nii.gz`` file to the mask ``.nii.gz`` written to disk: read +
    base64 + JSON (``encode``), POST to ``/invocations`` until the whole response is read
    (``request``: transfer, the server's JSON parsing, schema check, the pyfunc's ``predict`` and
    the JSON answer), JSON parse + base64 decode + write (``decode``). One warm-up request (the
    server's XLA compile) comes first.

Then ``--repeats`` rounds, each one node call and one request; the order alternates between rounds
(node first, then served first, ...). Reported: median, min and max seconds of each, the ratio
served / node of the medians, the per-round ratios, the request and response sizes, and the load
average; and CPU seconds per scan on both sides (the node process; the server's processes plus the
client's encoding, decoding and waiting), whose ratio other jobs on the machine disturb less than
the wall-clock one. The check is on the wall-clock ratio. The served mask must equal the node's
mask voxel for voxel (and in affine); the script exits non-zero if it does not. With ``--check`` it
also exits non-zero when the wall-clock ratio is above 1.2.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.serving_benchmark                      # conf/base U-Net, 5 rounds
    .venv/bin/python -m benchmarks.serving_benchmark --base-filters 32    # the study's width
    .venv/bin/python -m benchmarks.serving_benchmark --repeats 7 --check  # exit 1 if the ratio > 1.2

Results: ``data/08_reporting/benchmarks/serving_benchmark.json``, a table on stdout; the server's log
is printed if it fails to start.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import _common
from benchmarks.support.local_server import LocalServer, free_port
from benchmarks.support.project_copy import subprocess_env

TARGET_RATIO = 1.2
ARCHITECTURE = "unet"
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 900


def unet_settings(base_filters: int | None) -> dict[str, Any]:
    """``conf/base``'s U-Net: ``training.model`` with the ``unet`` overrides (and ``base_filters``),
    merged as the training pipeline merges them (``learning.setup.architecture_settings``)."""
    from pancreas_seg.learning.setup import architecture_settings  # noqa: PLC0415

    params = _common.conf("base", "parameters_training.yml")
    settings = architecture_settings(params["training"], params[ARCHITECTURE]["architecture"])["model"]
    if base_filters is not None:
        settings["base_filters"] = base_filters
    return settings


def log_model(trained: Any, settings: Any, folder: Path) -> tuple[str, str]:
    """Log ``trained`` with its ``PredictionSettings`` as the pyfunc model into a sqlite store under
    ``folder``: (tracking URI, model URI)."""
    import mlflow  # noqa: PLC0415

    from pancreas_seg.inference.serving import log_segmentation_model  # noqa: PLC0415

    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("serving_benchmark", artifact_location=(folder / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    uri = log_segmentation_model(run_id, trained, ARCHITECTURE, settings)
    client.set_terminated(run_id)
    return tracking_uri, uri


class Server(LocalServer):
    """``mlflow models serve -m <uri> --env-manager local`` on 127.0.0.1, in its own process group."""

    def __init__(self, model_uri: str, tracking_uri: str, folder: Path, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        # as tests/pipelines/test_serving.py serves: this checkout's src/ first on PYTHONPATH
        env = subprocess_env(MLFLOW_TRACKING_URI=tracking_uri, TF_CPP_MIN_LOG_LEVEL="2",
                             PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        super().__init__([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
                          "-t", str(REQUEST_TIMEOUT_S)],
                         f"{self.base}/ping", folder / "serve.log", folder, env)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the server's processes (CLI and uvicorn)."""
        import psutil  # noqa: PLC0415

        total = 0.0
        try:
            root = psutil.Process(self.process.pid)
            for proc in (root, *root.children(recursive=True)):
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
        return total


def serve_one(server: Server, image_path: Path, mask_path: Path) -> dict[str, Any]:
    """One scan through the endpoint as a client does it: seconds per client stage, payload sizes,
    and CPU seconds of the server and of this (waiting) client during the request."""
    from pancreas_seg.inference.serving import INPUT_BASE64, OUTPUT_BASE64  # noqa: PLC0415

    server_cpu0 = server.cpu_s()
    t0 = time.perf_counter()
    encoded = base64.b64encode(image_path.read_bytes()).decode("ascii")
    body = json.dumps({"dataframe_split": {"columns": [INPUT_BASE64], "data": [[encoded]]}}).encode()
    del encoded
    t1 = time.perf_counter()
    client_cpu0 = time.process_time()
    request = urllib.request.Request(f"{server.base}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            answer = response.read()
    except urllib.error.HTTPError as error:
        raise SystemExit(f"/invocations answered {error.code}: {error.read()[:2000]!r}") from None
    t2 = time.perf_counter()
    client_wait_cpu = time.process_time() - client_cpu0
    mask = base64.b64decode(json.loads(answer)["predictions"][0][OUTPUT_BASE64])
    mask_path.write_bytes(mask)
    t3 = time.perf_counter()
    return {"total_s": t3 - t0, "encode_s": t1 - t0, "request_s": t2 - t1, "decode_s": t3 - t2,
            "request_bytes": len(body), "response_bytes": len(answer), "mask_file_bytes": len(mask),
            "server_cpu_s": server.cpu_s() - server_cpu0, "client_cpu_during_request_s": client_wait_cpu}


def node_one(predictor: Any, image_path: Path, out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The inference pipeline's per-scan work (read, segment, write mask + overlay PNG), timed."""
    from pancreas_seg.task07.layout import case_id_from_path  # noqa: PLC0415

    save_args = _common.overlay_save_args()
    t0, cpu0 = time.perf_counter(), time.process_time()
    volume = _common.segment_case(predictor, image_path, out_dir, settings["overlay_window_hu"], save_args)
    return {"total_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
            "mask": str(out_dir / f"{case_id_from_path(image_path)}.nii.gz"), "shape": list(volume.array.shape)}


def same_mask(a: Path, b: Path) -> tuple[bool, str]:
    """Voxel-for-voxel and affine equality of two label-map files."""
    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    ia, ib = nib.load(a), nib.load(b)
    va, vb = np.asarray(ia.dataobj), np.asarray(ib.dataobj)
    if va.shape != vb.shape:
        return False, f"shapes differ: {va.shape} vs {vb.shape}"
    if not np.array_equal(ia.affine, ib.affine):
        return False, "affines differ"
    differing = int(np.count_nonzero(va != vb))
    return differing == 0, f"{differing} of {va.size} voxels differ; labels {np.unique(va).tolist()}"


def stats(values: list[float]) -> dict[str, float]:
    return {"median": _common.median(values), "min": min(values), "max": max(values)}


def main() -> None:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one node call + one request each)")
    parser.add_argument("--base-filters", type=int, default=None,
                        help="U-Net width (default: conf/base training.model.base_filters, 16; the study: 32)")
    parser.add_argument("--image-size", type=int, default=256, help="model input H = W, px (default 256)")
    parser.add_argument("--case-index", type=int, default=0, help="which cached phantom (0 = pancreas_001)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if served / node > {TARGET_RATIO}")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    load_start = os.getloadavg()
    _common.ensure_phantoms_512()
    image_path = Path(_common.phantom_pairs(_common.PHANTOM_ROOT)[args.case_index][0])
    settings = _common.inference_settings()
    model_settings = unet_settings(args.base_filters)
    size = (args.image_size, args.image_size)

    import keras  # noqa: PLC0415

    from pancreas_seg.inference.predictor import PredictionSettings, Predictor  # noqa: PLC0415

    prediction_settings = PredictionSettings.from_params(settings)   # both sides: the node's and the bundle's
    keras.utils.set_random_seed(0)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        folder = Path(tmp)
        (folder / "node").mkdir()
        (folder / "served").mkdir()
        trained, info = _common.untrained_single_stage_model(ARCHITECTURE, model_settings, size,
                                                             folder / "unet.keras")
        t0 = time.perf_counter()
        tracking_uri, model_uri = log_model(trained, prediction_settings, folder)
        log_s = time.perf_counter() - t0
        print(f"model: untrained U-Net {model_settings} at {size[0]} px, {info['params'] / 1e6:.2f}M params; "
              f"logged as {model_uri} in {log_s:.1f} s", flush=True)
        server = Server(model_uri, tracking_uri, folder, free_port())
        try:
            # the node's model loads and compiles while the server starts (nothing is timed yet)
            t0 = time.perf_counter()
            keras.backend.clear_session()
            predictor = Predictor.from_trained(trained, prediction_settings)
            node_load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            node_one(predictor, image_path, folder / "node", settings)
            node_warmup_s = time.perf_counter() - t0
            startup_s = server.wait_ready(STARTUP_TIMEOUT_S)
            startup_s += node_load_s + node_warmup_s   # it started before the node's load
            t0 = time.perf_counter()
            serve_one(server, image_path, folder / "served" / "warmup.nii.gz")
            served_warmup_s = time.perf_counter() - t0
            print(f"server ready after ~{startup_s:.0f} s; warm-up: node {node_warmup_s:.1f} s, "
                  f"served {served_warmup_s:.1f} s", flush=True)

            node_runs, served_runs = [], []
            for round_index in range(args.repeats):
                order = ("node", "served") if round_index % 2 == 0 else ("served", "node")
                for side in order:
                    if side == "node":
                        node_runs.append(node_one(predictor, image_path, folder / "node", settings))
                    else:
                        served_runs.append(serve_one(server, image_path, folder / "served" / image_path.name))
                n, s = node_runs[-1], served_runs[-1]
                print(f"  round {round_index + 1}/{args.repeats} ({' then '.join(order)}): node {n['total_s']:.2f} s, "
                      f"served {s['total_s']:.2f} s (encode {s['encode_s']:.2f}, request {s['request_s']:.2f}, "
                      f"decode {s['decode_s']:.2f}), ratio {s['total_s'] / n['total_s']:.3f}; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            equal, detail = same_mask(Path(node_runs[-1]["mask"]), folder / "served" / image_path.name)
        finally:
            server.stop()

    node = stats([r["total_s"] for r in node_runs])
    served = stats([r["total_s"] for r in served_runs])
    parts = {k: _common.median([r[k] for r in served_runs])
             for k in ("encode_s", "request_s", "decode_s", "server_cpu_s", "client_cpu_during_request_s")}
    node_cpu = _common.median([r["cpu_s"] for r in node_runs])
    ratio = served["median"] / node["median"]
    round_ratios = [s["total_s"] / n["total_s"] for s, n in zip(served_runs, node_runs, strict=True)]
    sizes = served_runs[-1]
    print()
    _common.print_table(
        ["path", "median s", "min s", "max s", "what is timed"],
        [["node", round(node["median"], 2), round(node["min"], 2), round(node["max"], 2),
          "_common.segment_case: read NIfTI, segment, write mask + overlay PNG"],
         ["served", round(served["median"], 2), round(served["min"], 2), round(served["max"], 2),
          f"client: encode {parts['encode_s']:.2f} + POST/response {parts['request_s']:.2f} + "
          f"decode/write {parts['decode_s']:.2f} (medians)"]])
    scan_bytes = image_path.stat().st_size
    print(f"\nscan {image_path.name} {node_runs[-1]['shape']} ({scan_bytes / 2**20:.1f} MiB .nii.gz); request "
          f"{sizes['request_bytes'] / 2**20:.1f} MiB JSON, response {sizes['response_bytes'] / 2**20:.2f} MiB JSON "
          f"(mask {sizes['mask_file_bytes'] / 2**20:.2f} MiB .nii.gz)")
    served_cpu = _common.median([r["server_cpu_s"] + r["encode_s"] + r["decode_s"] + r["client_cpu_during_request_s"]
                                 for r in served_runs])
    print(f"CPU seconds per scan (medians): node process {node_cpu:.2f}; served {served_cpu:.2f} = server processes "
          f"{parts['server_cpu_s']:.2f} + client encoding/decoding {parts['encode_s'] + parts['decode_s']:.2f} "
          f"+ client while waiting {parts['client_cpu_during_request_s']:.2f}; CPU ratio served / node "
          f"{served_cpu / node_cpu:.3f} (less sensitive to other jobs than the wall-clock ratio)")
    print(f"served mask == node mask: {equal} ({detail})")
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"ratio served / node (medians, {args.repeats} rounds): {ratio:.3f} -> {verdict} (target <= {TARGET_RATIO}); "
          f"per round {[round(r, 3) for r in round_ratios]}")
    load_end = os.getloadavg()
    path = _common.write_report("serving_benchmark", {
        "settings": {"repeats": args.repeats, "image_size_px": list(size), "model_settings": model_settings,
                     "params": info["params"], "inference": settings,
                     "prediction_settings": prediction_settings.to_dict(), "case": image_path.name,
                     "case_index": args.case_index, "model_uri_scheme": model_uri.split("/")[0]},
        "node": {**node, "cpu_s_median": node_cpu, "runs": node_runs, "load_model_s": node_load_s, "warmup_s": node_warmup_s},
        "served": {**served, "runs": served_runs, "median_parts": parts, "warmup_s": served_warmup_s,
                   "startup_s": startup_s},
        "scan_bytes": scan_bytes, "ratio_served_over_node": ratio, "cpu_ratio_served_over_node": served_cpu / node_cpu, "round_ratios": round_ratios,
        "masks_equal": equal, "mask_comparison": detail, "target_ratio": TARGET_RATIO,
        "load_avg_at_end": load_end, "total_wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path}  (total {time.perf_counter() - t_start:.0f} s; load average at start "
          f"{' '.join(f'{v:.1f}' for v in load_start)}, now {' '.join(f'{v:.1f}' for v in load_end)})")
    if not equal:
        raise SystemExit("FAIL: the served mask differs from the inference node's mask")
    if args.check and ratio > TARGET_RATIO:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
