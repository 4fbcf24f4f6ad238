"""The served model under load: 1, 4 and 16 concurrent clients against the real ``mlflow models serve``.

What it checks (issue 24)
-------------------------
The served model (``pancreas_seg.inference.serving``) refuses paths, checks NIfTI headers before it
inflates anything (413/400) and bounds concurrency (503 + ``Retry-After``; ``inference.serving`` in
``conf/base/parameters_inference.yml``). This script drives ONE real ``mlflow models serve
--env-manager local`` on 127.0.0.1 with a mix of traffic for a fixed time per level, then stops
itself, and checks four targets (2-core CPU machine):

1. no 5xx answer other than 503 (overload is answered 503, never 500/502/504);
2. no lost answer: every request (except the deliberate disconnects) gets an HTTP status; a
   connection error or a client timeout without one is *lost*;
3. the server's peak RSS (psutil, the whole process tree: the ``mlflow`` CLI, its shell and the
   uvicorn process, sampled every ``--sample-s``) at the highest level (16 clients) is at most
   1.5x that at the lowest (1 client);
4. after the loads the server still segments a real CT correctly: the mask it returns equals,
   voxel for voxel and in affine, the in-process ``Predictor``'s mask of the same file and the
   mask the server returned for it before the loads.

The traffic. Each client is a loop with its own seeded RNG that, until the level's time is up,
picks one job (weights in :data:`MIX`) and sends it on a fresh connection (``Connection: close``):

* ``valid``: half of them the real CT below, half one of the four synthetic test phantoms
  ``data/01_raw/Task07_Pancreas_synthetic/imagesTs/`` (256 x 256 x 31-41, 2-3 MB ``.nii.gz``; cases
  the model never saw);
* malformed: ``bad_base64`` (not base64), ``not_nifti`` (base64 of text), ``nifti_4d`` (a valid 4D
  NIfTI): expected 400;
* bombs: ``bomb``, a 1 MB gzip of 1 GiB of zeros behind a 512 x 512 x 2048 header (expected 413
  from its header), and ``liar``, a header declaring 16 x 20 x 6 int16 voxels in front of the same
  gigabyte (expected 400 one byte past the declared size);
* ``disconnect``: a raw socket sends the request line and headers with ``Content-Length`` of
  :data:`DISCONNECT_DECLARED_BYTES`, :data:`DISCONNECT_SENT_BYTES` of the body, and closes.

A 503 is answered as a client should: the job waits ``Retry-After`` seconds and is sent again
(until the level ends). The HTTP client is a small raw-socket one (:func:`post`): it watches the
socket while it uploads, so an answer the server sends *before* it has read the body (the guard's
early 503/413) is read rather than lost to the reset that follows the server's close. Requests
are timed from connect to the last byte of the answer.

Per level it reports p50/p95 latency of the valid requests answered 2xx (per attempt, and per job
including the 503 waits), throughput (valid answers 2xx per second of the level's wall time,
including the drain of requests in flight at its end), peak server RSS, counts of 2xx, 4xx, 503,
other 5xx and lost answers, answers that did not fit the request kind (a valid scan refused, a bomb
accepted), 503s without ``Retry-After``, the server log's tracebacks, and how many clients got no
valid answer in the whole level ("starved"; fairness, not a target). After each level one
real-CT request on the idle server must be answered 200 with the reference mask (an admission
ticket leaked by a disconnect would show here as a 503).

The model. A model a user would serve: the newest trained U-Net in ``data/06_models/unet`` with
its model card (``model_store.latest_trained_model``); without one, an UNTRAINED ``conf/base`` U-Net
at 256 px with a valid card (``_common.untrained_single_stage_model``, as ``serving_benchmark.py``
does). The output says which. It is logged with ``pancreas_seg.inference.serving.log_segmentation_model``
into a temporary sqlite MLflow store with ``conf/base``'s ``inference`` settings and its
``inference.serving`` limits (``PANCREAS_SEG_SERVING_*`` variables of the calling shell are NOT
passed to the server, so the limits are conf/base's), and served with ``-t 120``.

Real data: ``/work/shared/realdata/ct_abdomen_3mm.nii.gz`` (122 x 101 x 112, 3 mm), the example CT
of the TotalSegmentator repository (``tests/reference_files/example_ct.nii.gz``, Apache-2.0 licence);
see ``/work/shared/realdata/NOTICE.md``.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.serving_load                  # 1, 4, 16 clients, 120 s each (~8 min)
    .venv/bin/python -m benchmarks.serving_load --seconds 20     # a quick run

Result: ``benchmarks/results/serving_load.json`` (written atomically), a table and PASS/FAIL per
target on stdout; the exit status is 1 when a target fails.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import gzip
import json
import os
import random
import re
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _common
from benchmarks.support.bombs import gzip_of_zeros
from benchmarks.support.local_server import LocalServer, free_port
from benchmarks.support.project_copy import subprocess_env

REPO_ROOT = _common.REPO_ROOT
RESULT_PATH = REPO_ROOT / "benchmarks" / "results" / "serving_load.json"
REAL_CT = Path("/work/shared/realdata/ct_abdomen_3mm.nii.gz")
REAL_CT_ATTRIBUTION = ("ct_abdomen_3mm.nii.gz: the example CT of the TotalSegmentator repository "
                       "(tests/reference_files/example_ct.nii.gz), Apache-2.0 licence; see /work/shared/realdata/NOTICE.md")
PHANTOM_DIR = REPO_ROOT / "data" / "01_raw" / "Task07_Pancreas_synthetic" / "imagesTs"
MODELS_DIR = REPO_ROOT / "data" / "06_models"
ARCHITECTURE = "unet"

LEVELS = (1, 4, 16)
MIX = {"valid": 0.60, "bad_base64": 0.05, "not_nifti": 0.05, "nifti_4d": 0.05, "bomb": 0.07, "liar": 0.07,
       "disconnect": 0.11}
"""Job kinds and their weights in each client's loop."""
EXPECTED = {"valid": {200}, "bad_base64": {400}, "not_nifti": {400}, "nifti_4d": {400}, "bomb": {413},
            "liar": {400}}
"""The answer each kind should get from a server with capacity (503 is always acceptable)."""
DISCONNECT_DECLARED_BYTES = 64 * 2**20
DISCONNECT_SENT_BYTES = 512 * 2**10
SERVER_TIMEOUT_S = 120          # mlflow models serve -t (>= serving.request_timeout_s, 60)
CLIENT_TIMEOUT_S = 180.0        # a socket that stays silent this long is a lost answer
STARTUP_TIMEOUT_S = 300
RSS_RATIO_LIMIT = 1.5
UPLOAD_CHUNK = 256 * 2**10
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------
def _header_only(shape: tuple[int, ...], dtype: Any) -> bytes:
    """The 352 bytes (header + extension flag) of a single-file NIfTI-1 of ``shape``, 0.8 x 0.8 x 1 mm."""
    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["magic"] = b"n+1"
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def request_body(value: str) -> bytes:
    """The ``/invocations`` JSON of one ``nifti_base64`` row."""
    return json.dumps({"dataframe_split": {"columns": ["nifti_base64"], "data": [[value]]}}).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Payloads:
    real_ct: bytes
    phantoms: list[bytes]
    malformed: dict[str, bytes]
    sizes: dict[str, int] = field(default_factory=dict)


def build_payloads() -> Payloads:
    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    real_ct = request_body(b64(REAL_CT.read_bytes()))
    phantom_files = sorted(PHANTOM_DIR.glob("*.nii.gz"))
    if not phantom_files:
        raise SystemExit(f"no synthetic test phantoms under {PHANTOM_DIR}: run `kedro run --pipelines=ingestion` "
                         "(or the default pipeline) first")
    phantoms = [request_body(b64(path.read_bytes())) for path in phantom_files[:4]]
    four_d = nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.diag([0.8, 0.8, 2.5, 1.0])).to_bytes()
    bomb = gzip_of_zeros(_header_only((512, 512, 2048), np.uint8), 1 << 30)
    liar = gzip_of_zeros(_header_only((16, 20, 6), np.int16), 1 << 30)
    malformed = {
        "bad_base64": request_body("this is *not* base64 at all!!"),
        "not_nifti": request_body(b64(b"certainly not a NIfTI file, just some text " * 20)),
        "nifti_4d": request_body(b64(gzip.compress(four_d))),
        "bomb": request_body(b64(bomb)),
        "liar": request_body(b64(liar)),
    }
    sizes = {"real_ct": len(real_ct), "phantoms": [len(p) for p in phantoms], "bomb_gzip": len(bomb),
             "liar_gzip": len(liar), **{k: len(v) for k, v in malformed.items()}}
    return Payloads(real_ct, phantoms, malformed, sizes)


# ---------------------------------------------------------------------------------------------
# A small HTTP/1.1 client on a raw socket
# ---------------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int | None            # None: no HTTP answer (lost)
    headers: dict[str, str]
    body: bytes
    seconds: float
    early: bool = False           # answered before the whole body was sent
    error: str | None = None      # why there is no answer


def _headers(port: int, length: int) -> bytes:
    return (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode("ascii")


def _dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


def post(port: int, body: bytes, timeout: float = CLIENT_TIMEOUT_S) -> Answer:
    """POST ``body`` to ``/invocations``; read the answer even when it comes before the upload ends."""
    start = time.perf_counter()
    early = False
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return Answer(None, {}, b"", time.perf_counter() - start, error=f"connect: {type(exc).__name__}")
    try:
        sock.sendall(_headers(port, len(body)))
        view, sent = memoryview(body), 0
        while sent < len(body):
            readable, writable, _ = select.select([sock], [sock], [], timeout)
            if readable:                      # the server answered (or closed) before reading it all
                early = True
                break
            if not writable:
                raise TimeoutError("upload stalled")
            try:
                sent += sock.send(view[sent:sent + UPLOAD_CHUNK])
            except (BrokenPipeError, ConnectionResetError):
                early = True
                break
        data = bytearray()
        try:
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            if b"\r\n\r\n" not in data:
                raise
        seconds = time.perf_counter() - start
        head, sep, payload = bytes(data).partition(b"\r\n\r\n")
        if not sep:
            return Answer(None, {}, b"", seconds, early, error="closed without an answer"
                          if not data else f"incomplete answer ({len(data)} bytes)")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            payload = _dechunk(payload)
        return Answer(status, headers, payload, seconds, early)
    except (TimeoutError, socket.timeout) as exc:
        return Answer(None, {}, b"", time.perf_counter() - start, early, error=f"timeout ({exc})")
    except OSError as exc:
        return Answer(None, {}, b"", time.perf_counter() - start, early, error=f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()


def disconnect_mid_upload(port: int) -> str:
    """Headers with a large ``Content-Length``, part of the body, then close: what happened."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(_headers(port, DISCONNECT_DECLARED_BYTES))
            sock.sendall(b'{"dataframe_split": {"columns": ["nifti_base64"], "data": [["'
                         + b"A" * DISCONNECT_SENT_BYTES)
            time.sleep(0.05)
        return "closed"
    except OSError as exc:
        return f"{type(exc).__name__}"


# ---------------------------------------------------------------------------------------------
# The server and its memory
# ---------------------------------------------------------------------------------------------
class Server(LocalServer):
    """``mlflow models serve -m <uri> --env-manager local -t 120`` on 127.0.0.1, its own process group."""

    def __init__(self, model_uri: str, tracking_uri: str, folder: Path, port: int) -> None:
        self.port = port
        env = subprocess_env(MLFLOW_TRACKING_URI=tracking_uri, TF_CPP_MIN_LOG_LEVEL="2",
                             PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        env = {k: v for k, v in env.items() if not k.startswith("PANCREAS_SEG_SERVING_")}
        super().__init__([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
                          "-t", str(SERVER_TIMEOUT_S)],
                         f"http://127.0.0.1:{port}/ping", folder / "serve.log", folder, env)

    def rss(self) -> tuple[int, int]:
        """(RSS of the whole process tree, RSS of its largest process: uvicorn), bytes."""
        import psutil  # noqa: PLC0415

        total, largest = 0, 0
        try:
            root = psutil.Process(self.process.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0, 0
        for proc in family:
            try:
                rss = proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            total += rss
            largest = max(largest, rss)
        return total, largest

    def log_size(self) -> int:
        self._log.flush()
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        self._log.flush()
        with self.log_path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")


class RssSampler(threading.Thread):
    """Samples the server tree's RSS every ``interval_s``; :meth:`take` returns and resets the peaks."""

    def __init__(self, server: Server, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.server, self.interval_s = server, interval_s
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.peak_tree = self.peak_largest = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            tree, largest = self.server.rss()
            with self.lock:
                self.peak_tree = max(self.peak_tree, tree)
                self.peak_largest = max(self.peak_largest, largest)
                self.samples += 1
            self.stop_event.wait(self.interval_s)

    def take(self) -> dict[str, float]:
        with self.lock:
            result = {"peak_tree_mib": self.peak_tree / MIB, "peak_uvicorn_mib": self.peak_largest / MIB,
                      "samples": self.samples}
            self.peak_tree = self.peak_largest = self.samples = 0
        return result


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def model_to_serve(folder: Path) -> tuple[Any, str]:
    """The newest trained U-Net in ``data/06_models`` (with its card), else an untrained conf/base one."""
    from pancreas_seg.inference.model_store import latest_trained_model  # noqa: PLC0415

    try:
        trained = latest_trained_model(MODELS_DIR, ARCHITECTURE)
        card = trained.card
        return trained, (f"TRAINED U-Net {trained.model_file.relative_to(REPO_ROOT)} (card: dataset "
                         f"{card.dataset!r}, input {list(card.input_shape) if card.input_shape else '?'}, "
                         f"{len(card.cases.train)} training cases, best {card.monitor} {card.best_value})")
    except FileNotFoundError as exc:
        from benchmarks.serving_benchmark import unet_settings  # noqa: PLC0415

        print(f"no trained U-Net ({exc}); serving an UNTRAINED conf/base U-Net", flush=True)
        settings = unet_settings(None)
        trained, info = _common.untrained_single_stage_model(ARCHITECTURE, settings, (256, 256),
                                                             folder / "unet.keras")
        return trained, f"UNTRAINED conf/base U-Net at 256 px, {info['params'] / 1e6:.2f}M params (valid card)"


def log_model(trained: Any, prediction_settings: Any, serving: dict[str, Any], folder: Path) -> tuple[str, str]:
    """Log ``trained`` as the project's pyfunc into a sqlite store under ``folder``: (tracking URI, model URI)."""
    import mlflow  # noqa: PLC0415

    from pancreas_seg.inference.serving import log_segmentation_model  # noqa: PLC0415

    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("serving_load", artifact_location=(folder / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    uri = log_segmentation_model(run_id, trained, ARCHITECTURE, prediction_settings, serving)
    client.set_terminated(run_id)
    return tracking_uri, uri


def mask_of(answer: Answer) -> Any:
    """The label map (nibabel image) in a 200 answer of one row."""
    from pancreas_seg.inference.serving import decode_mask  # noqa: PLC0415

    return decode_mask(json.loads(answer.body)["predictions"][0]["mask_nifti_base64"])


def compare(image: Any, reference: tuple[Any, Any]) -> tuple[bool, str]:
    """Voxel-for-voxel and affine equality of a nibabel label map with (array, affine)."""
    import numpy as np  # noqa: PLC0415

    array, affine = reference
    got = np.asarray(image.dataobj)
    if got.shape != array.shape:
        return False, f"shape {got.shape} vs {array.shape}"
    if not np.allclose(image.affine, affine, rtol=0, atol=1e-5):
        return False, "affines differ"
    differing = int(np.count_nonzero(got != array))
    labels = {int(v): int(n) for v, n in zip(*np.unique(got, return_counts=True), strict=True)}
    return differing == 0, f"{differing} of {got.size} voxels differ; label counts {labels}"


# ---------------------------------------------------------------------------------------------
# One load level
# ---------------------------------------------------------------------------------------------
@dataclass
class Record:
    kind: str
    status: int | None
    seconds: float
    early: bool = False
    retry_after: str | None = None
    error: str | None = None
    job_seconds: float | None = None     # valid 2xx: from the job's first attempt (503 waits included)
    message: str = ""


class Client(threading.Thread):
    def __init__(self, index: int, port: int, payloads: Payloads, deadline: float, seed: int) -> None:
        super().__init__(daemon=True, name=f"client{index}")
        self.port, self.payloads, self.deadline = port, payloads, deadline
        self.rng = random.Random(seed)
        self.records: list[Record] = []
        self.disconnects: Counter[str] = Counter()
        self.abandoned = 0            # jobs still refused 503 when the level ended

    def _job(self) -> tuple[str, bytes | None]:
        kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if kind == "disconnect":
            return kind, None
        if kind == "valid":
            body = self.payloads.real_ct if self.rng.random() < 0.5 else self.rng.choice(self.payloads.phantoms)
            return kind, body
        return kind, self.payloads.malformed[kind]

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            kind, body = self._job()
            if body is None:
                self.disconnects[disconnect_mid_upload(self.port)] += 1
                continue
            job_start = time.perf_counter()
            while True:
                answer = post(self.port, body)
                record = Record(kind, answer.status, answer.seconds, answer.early,
                                answer.headers.get("retry-after"), answer.error)
                if answer.status is not None and answer.status >= 400:
                    try:
                        record.message = str(json.loads(answer.body).get("message", ""))[:160]
                    except ValueError:
                        record.message = answer.body[:160].decode(errors="replace")
                if answer.status is not None and 200 <= answer.status < 300:
                    record.job_seconds = time.perf_counter() - job_start
                self.records.append(record)
                if answer.status != 503:
                    break
                try:
                    wait = float(answer.headers.get("retry-after", "1"))
                except ValueError:
                    wait = 1.0
                if time.monotonic() + wait >= self.deadline:
                    self.abandoned += 1
                    time.sleep(max(0.0, self.deadline - time.monotonic()))
                    break
                time.sleep(wait)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


def summarise(records: list[Record], wall_s: float) -> dict[str, Any]:
    statuses = Counter("lost" if r.status is None else r.status for r in records)
    valid_ok = [r for r in records if r.kind == "valid" and r.status is not None and 200 <= r.status < 300]
    latencies = [r.seconds for r in valid_ok]
    job_latencies = [r.job_seconds for r in valid_ok if r.job_seconds is not None]
    unexpected = Counter(f"{r.kind}->{r.status}" for r in records
                         if r.status is not None and r.status != 503 and r.status not in EXPECTED[r.kind])
    by_kind: dict[str, Counter] = {}
    for r in records:
        by_kind.setdefault(r.kind, Counter())["lost" if r.status is None else str(r.status)] += 1
    return {
        "requests": len(records),
        "2xx": sum(n for s, n in statuses.items() if s != "lost" and 200 <= s < 300),
        "4xx": sum(n for s, n in statuses.items() if s != "lost" and 400 <= s < 500),
        "503": statuses.get(503, 0),
        "other_5xx": sum(n for s, n in statuses.items() if s != "lost" and s >= 500 and s != 503),
        "lost": statuses.get("lost", 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "valid_answered": len(valid_ok),
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "max_s": max(latencies) if latencies else None,
        "job_p50_s": percentile(job_latencies, 50), "job_p95_s": percentile(job_latencies, 95),
        "throughput_per_s": len(valid_ok) / wall_s if wall_s > 0 else 0.0,
        "unexpected": dict(unexpected),
        "503_without_retry_after": sum(1 for r in records if r.status == 503 and not r.retry_after),
        "answered_before_upload_end": Counter(str(r.status) for r in records if r.early),
        "lost_errors": Counter(r.error for r in records if r.status is None),
        "other_5xx_messages": Counter(f"{r.status}: {r.message}" for r in records
                                      if r.status is not None and r.status >= 500 and r.status != 503),
        "messages_503": Counter(re.sub(r"[\d.]+", "N", r.message.split(";")[0]) for r in records if r.status == 503),
    }


def run_level(n_clients: int, seconds: float, server: Server, sampler: RssSampler, payloads: Payloads,
              seed: int) -> dict[str, Any]:
    log_offset = server.log_size()
    load_start = os.getloadavg()
    sampler.take()
    start = time.monotonic()
    deadline = start + seconds
    clients = [Client(i, server.port, payloads, deadline, seed * 1000 + n_clients * 100 + i) for i in range(n_clients)]
    for client in clients:
        client.start()
    next_report = start + min(15.0, seconds / 2)
    hard_stop = deadline + CLIENT_TIMEOUT_S + 30
    while any(c.is_alive() for c in clients) and time.monotonic() < hard_stop:
        time.sleep(0.5)
        now = time.monotonic()
        if now >= next_report:
            records = [r for c in clients for r in list(c.records)]
            counts = Counter("lost" if r.status is None else (r.status // 100 * 100 if r.status != 503 else 503)
                             for r in records)
            valid = sum(1 for r in records if r.kind == "valid" and r.status == 200)
            tree, _ = server.rss()
            phase = "draining" if now > deadline else f"{now - start:.0f}/{seconds:.0f} s"
            print(f"    [{n_clients:>2} clients] {phase}: {len(records)} requests, valid 200: {valid}, "
                  f"2xx {counts.get(200, 0)}, 4xx {counts.get(400, 0)}, 503 {counts.get(503, 0)}, "
                  f"other 5xx {counts.get(500, 0)}, lost {counts.get('lost', 0)}; server RSS {tree / MIB:.0f} MiB; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            next_report = now + 15.0
    wall_s = time.monotonic() - start
    still_running = sum(c.is_alive() for c in clients)
    records = [r for c in clients for r in c.records]
    summary = summarise(records, wall_s)
    disconnects: Counter[str] = sum((c.disconnects for c in clients), Counter())
    log = server.log_since(log_offset)
    summary |= {
        "clients": n_clients, "seconds": seconds, "wall_s": wall_s, "clients_still_running": still_running,
        "disconnects": sum(disconnects.values()), "disconnect_outcomes": dict(disconnects),
        "jobs_abandoned_after_503": sum(c.abandoned for c in clients),
        "valid_per_client": [sum(1 for r in c.records if r.kind == "valid" and r.status == 200) for c in clients],
        "clients_without_valid_answer": sum(1 for c in clients
                                            if not any(r.kind == "valid" and r.status == 200 for r in c.records)),
        "rss": sampler.take(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "server_log": {"tracebacks": log.count("Traceback (most recent call last)"),
                       "asgi_exceptions": log.count("Exception in ASGI application"),
                       "refused_lines": len(re.findall(r"request refused|refused a request", log)),
                       "exception_types": dict(Counter(re.findall(
                           r"^([A-Za-z_][\w.]*(?:Error|Exception|Disconnect))(?::|$)", log, flags=re.M)))},
    }
    for key in ("answered_before_upload_end", "lost_errors", "other_5xx_messages", "messages_503"):
        summary[key] = dict(summary[key])
    return summary


def wait_idle(port: int, body: bytes, reference: tuple[Any, Any], timeout_s: float = 120) -> dict[str, Any]:
    """After a level: one real-CT request on the (now idle) server; 200 and the reference mask expected."""
    start = time.monotonic()
    attempts = []
    while True:
        answer = post(port, body)
        attempts.append(answer.status)
        if answer.status != 503 or time.monotonic() - start > timeout_s:
            break
        time.sleep(1.0)
    result: dict[str, Any] = {"statuses": attempts, "seconds": answer.seconds}
    if answer.status == 200:
        equal, detail = compare(mask_of(answer), reference)
        result |= {"equal": equal, "detail": detail}
    else:
        result |= {"equal": False, "detail": f"answered {answer.status}: {answer.body[:300]!r} {answer.error or ''}"}
    return result


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(payload, file, indent=2, default=float)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)               # mkstemp creates it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_state() -> dict[str, Any]:
    """The checkout's HEAD and the uncommitted changes under ``src/`` (the served code), if git answers."""
    import subprocess  # noqa: PLC0415

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    return {"head": git("rev-parse", "HEAD"), "src_changes": git("status", "--porcelain", "--", "src").splitlines()}


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of load per level (default 120)")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS),
                        help="concurrent clients per level (default 1 4 16); the RSS target compares the "
                             "largest with the smallest")
    parser.add_argument("--sample-s", type=float, default=0.1, help="RSS sampling interval, s (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULT_PATH)
    args = parser.parse_args()
    if args.seconds <= 0 or not args.levels or min(args.levels) < 1:
        parser.error("--seconds must be > 0 and --levels >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print(f"serving_load: levels {args.levels} clients x {args.seconds:g} s; load average "
          f"{' '.join(f'{v:.2f}' for v in load_start)}", flush=True)
    print(f"real CT: {REAL_CT_ATTRIBUTION}", flush=True)

    t0 = time.perf_counter()
    payloads = build_payloads()
    print(f"payloads built in {time.perf_counter() - t0:.1f} s: real CT request {payloads.sizes['real_ct'] / MIB:.2f} MiB, "
          f"phantom requests {[round(s / MIB, 2) for s in payloads.sizes['phantoms']]} MiB, bomb gzip "
          f"{payloads.sizes['bomb_gzip'] / 1e6:.2f} MB, liar gzip {payloads.sizes['liar_gzip'] / 1e6:.2f} MB",
          flush=True)

    from pancreas_seg.imaging.nifti_io import load_nifti  # noqa: PLC0415
    from pancreas_seg.inference.predictor import PredictionSettings  # noqa: PLC0415
    from pancreas_seg.inference.serving_settings import ServingSettings  # noqa: PLC0415

    inference = _common.inference_settings()
    serving_params = dict(inference.get("serving") or {})
    serving_settings = ServingSettings.from_params(serving_params)
    prediction_settings = PredictionSettings.from_params(inference)
    results: dict[str, Any] = {"benchmark": "serving_load", "started_at_utc": started_at,
                               "machine": _common.machine_info(), "git": git_state(), "command": " ".join(["python -m benchmarks.serving_load", *sys.argv[1:]]),
                               "settings": {"levels": args.levels, "seconds": args.seconds, "mix": MIX,
                                            "client_timeout_s": CLIENT_TIMEOUT_S, "server_timeout_s": SERVER_TIMEOUT_S,
                                            "serving": serving_settings.to_dict(),
                                            "prediction": prediction_settings.to_dict(),
                                            "disconnect": {"declared_bytes": DISCONNECT_DECLARED_BYTES,
                                                           "sent_bytes": DISCONNECT_SENT_BYTES},
                                            "payload_bytes": payloads.sizes},
                               "real_ct": {"file": str(REAL_CT), "attribution": REAL_CT_ATTRIBUTION}}
    with tempfile.TemporaryDirectory(prefix="bench_serving_load_") as tmp:
        folder = Path(tmp)
        trained, model_description = model_to_serve(folder)
        t0 = time.perf_counter()
        tracking_uri, model_uri = log_model(trained, prediction_settings, serving_params, folder)
        print(f"model: {model_description}; logged as {model_uri} in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"serving limits (conf/base inference.serving): {serving_settings.to_dict()}", flush=True)
        results["model"] = {"description": model_description, "trained": model_description.startswith("TRAINED"),
                            "card_version": trained.card.version}
        server = Server(model_uri, tracking_uri, folder, free_port())
        sampler = RssSampler(server, args.sample_s)
        try:
            # the in-process reference while the server starts
            import keras  # noqa: PLC0415

            from pancreas_seg.inference.predictor import Predictor  # noqa: PLC0415

            t0 = time.perf_counter()
            predictor = Predictor.from_trained(trained, prediction_settings)
            ct = load_nifti(REAL_CT)
            reference = (predictor.segment(ct.array, ct.affine, "real_ct"), ct.affine)
            del predictor
            keras.backend.clear_session()
            print(f"in-process Predictor mask of the real CT in {time.perf_counter() - t0:.1f} s "
                  f"(labels {sorted(set(reference[0].ravel().tolist()))})", flush=True)
            startup_s = server.wait_ready(STARTUP_TIMEOUT_S)
            sampler.start()
            warm = post(server.port, payloads.real_ct)
            if warm.status != 200:
                raise SystemExit(f"the server's first real-CT answer is {warm.status}: {warm.body[:500]!r} "
                                 f"{warm.error}\n{server.log_tail()}")
            pre_equal, pre_detail = compare(mask_of(warm), reference)
            pre_mask = mask_of(warm)
            import numpy as np  # noqa: PLC0415

            pre_reference = (np.asarray(pre_mask.dataobj), pre_mask.affine)
            for body in payloads.phantoms:   # warm every shape once
                post(server.port, body)
            idle = sampler.take()
            print(f"server ready (~{startup_s:.0f} s after the in-process reference); reference request "
                  f"{warm.seconds:.2f} s, served == in-process: {pre_equal} ({pre_detail}); idle RSS "
                  f"{idle['peak_tree_mib']:.0f} MiB (tree), {idle['peak_uvicorn_mib']:.0f} MiB (uvicorn)", flush=True)
            results["reference"] = {"served_equals_in_process": pre_equal, "detail": pre_detail,
                                    "seconds": warm.seconds, "startup_s": startup_s, "idle_rss": idle}

            levels = []
            for n_clients in args.levels:
                print(f"level {n_clients} client(s), {args.seconds:g} s; load {os.getloadavg()[0]:.2f}", flush=True)
                level = run_level(n_clients, args.seconds, server, sampler, payloads, args.seed)
                level["probe_after"] = wait_idle(server.port, payloads.real_ct, reference)
                levels.append(level)
                print(f"  done in {level['wall_s']:.0f} s: valid 200 {level['valid_answered']} "
                      f"({level['throughput_per_s']:.3f}/s), p50 {fmt(level['p50_s'])} s, p95 {fmt(level['p95_s'])} s; "
                      f"2xx {level['2xx']}, 4xx {level['4xx']}, 503 {level['503']}, other 5xx {level['other_5xx']}, "
                      f"lost {level['lost']}, disconnects {level['disconnects']}; peak RSS "
                      f"{level['rss']['peak_tree_mib']:.0f} MiB; unexpected {level['unexpected'] or 'none'}; "
                      f"probe after: {level['probe_after']['statuses']} equal={level['probe_after']['equal']}; "
                      f"server log: {level['server_log']['tracebacks']} traceback(s) "
                      f"{level['server_log']['exception_types'] or ''}",
                      flush=True)
                if server.process.poll() is not None:
                    print(f"  the server exited ({server.process.returncode})!\n{server.log_tail()}", flush=True)
                    break

            final = post(server.port, payloads.real_ct)
            if final.status == 200:
                final_mask = mask_of(final)
                final_equal, final_detail = compare(final_mask, reference)
                final_pre_equal, _ = compare(final_mask, pre_reference)
            else:
                final_equal, final_pre_equal = False, False
                final_detail = f"answered {final.status}: {final.body[:300]!r} {final.error or ''}"
            alive = server.process.poll() is None
        finally:
            sampler.stop_event.set()
            server_log_tail = server.log_tail(6000)
            server.stop()

    lowest, highest = levels[0], levels[-1]
    by_clients = {lv["clients"]: lv for lv in levels}
    lowest, highest = by_clients[min(by_clients)], by_clients[max(by_clients)]
    rss_ratio = highest["rss"]["peak_tree_mib"] / lowest["rss"]["peak_tree_mib"]
    targets = {
        "no 5xx other than 503": (sum(lv["other_5xx"] for lv in levels) == 0,
                                  f"{[lv['other_5xx'] for lv in levels]} per level"),
        "no lost answers": (sum(lv["lost"] for lv in levels) == 0, f"{[lv['lost'] for lv in levels]} per level"),
        f"peak RSS at {highest['clients']} clients <= {RSS_RATIO_LIMIT}x at {lowest['clients']}":
            (rss_ratio <= RSS_RATIO_LIMIT, f"{highest['rss']['peak_tree_mib']:.0f} / "
                                           f"{lowest['rss']['peak_tree_mib']:.0f} MiB = {rss_ratio:.2f}x"),
        "real CT answered correctly after the loads": (alive and final_equal and final_pre_equal and pre_equal,
                                                        f"status {final.status}; == in-process: {final_equal}; "
                                                        f"== pre-load request: {final_pre_equal}; {final_detail}"),
    }

    print()
    print(f"model: {model_description}")
    _common.print_table(
        ["clients", "p50 s", "p95 s", "valid/s", "peak RSS MiB", "2xx", "4xx", "503", "other 5xx", "lost",
         "disconnects", "starved clients", "load avg"],
        [[lv["clients"], fmt(lv["p50_s"]), fmt(lv["p95_s"]), fmt(lv["throughput_per_s"], 3),
          f"{lv['rss']['peak_tree_mib']:.0f}", lv["2xx"], lv["4xx"], lv["503"], lv["other_5xx"], lv["lost"],
          lv["disconnects"], f"{lv['clients_without_valid_answer']}/{lv['clients']}",
          f"{lv['load_avg_start'][0]:.2f}->{lv['load_avg_end'][0]:.2f}"] for lv in levels])
    print("(p50/p95: seconds per valid request answered 2xx, per attempt; valid/s: those answers per second of "
          "the level's wall time; peak RSS: the server's process tree; starved clients: clients with no valid "
          "answer in the whole level)")
    print()
    for name, (ok, detail) in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    for lv in levels:   # not a target: fairness between clients that honour Retry-After
        if lv["clients_without_valid_answer"]:
            print(f"NOTE  at {lv['clients']} clients, {lv['clients_without_valid_answer']} client(s) got no valid "
                  f"answer in {lv['seconds']:g} s (valid answers per client {lv['valid_per_client']}; "
                  f"{lv['jobs_abandoned_after_503']} job(s) still refused 503 at the end): clients that wait "
                  "Retry-After lose every free admission to clients re-submitting right after their answer")
    load_end = os.getloadavg()
    results |= {"levels": levels, "rss_ratio_highest_over_lowest": rss_ratio,
                "final_real_ct": {"status": final.status, "seconds": final.seconds, "equal_in_process": final_equal,
                                  "equal_pre_load_request": final_pre_equal, "detail": final_detail,
                                  "server_alive": alive},
                "targets": {name: {"pass": ok, "detail": detail} for name, (ok, detail) in targets.items()},
                "all_pass": all(ok for ok, _ in targets.values()),
                "load_avg_start": load_start, "load_avg_end": load_end,
                "total_wall_s": time.perf_counter() - t_start, "server_log_tail": server_log_tail}
    write_json_atomic(args.output, results)
    print(f"\nwrote {args.output} (total {time.perf_counter() - t_start:.0f} s; load average at start "
          f"{' '.join(f'{v:.2f}' for v in load_start)}, at end {' '.join(f'{v:.2f}' for v in load_end)})")
    if not results["all_pass"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
