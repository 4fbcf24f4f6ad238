"""What a process told the MLflow server, as the process saw it: every run it created, every param,
metric step and tag it logged and every artifact file it uploaded, recorded AFTER the server
answered OK. The concurrency tests compare the server's contents against it: nothing lost,
nothing duplicated, nothing extra.

It is loaded as ``sitecustomize`` (:func:`install_as_sitecustomize` copies this file into a folder
that goes first on ``PYTHONPATH``), so it also records inside the processes Kedro, the tuning
workers and Dask start. With ``PANCREAS_SEG_MLFLOW_AUDIT=<folder>`` set, each process appends JSON
lines to ``<folder>/<pid>.jsonl``; without it, nothing happens. The real calls go through unchanged:
this wraps ``RestStore`` and ``HttpArtifactRepository`` methods, it replaces nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import defaultdict
from pathlib import Path

AUDIT_ENV = "PANCREAS_SEG_MLFLOW_AUDIT"
_lock = threading.Lock()


def _record(kind: str, **fields: object) -> None:
    folder = os.environ.get(AUDIT_ENV)
    if not folder:
        return
    line = json.dumps({"kind": kind, **fields}) + "\n"
    with _lock, open(Path(folder) / f"{os.getpid()}.jsonl", "a") as file:
        file.write(line)


def install() -> None:
    """Wrap the REST store and the proxied-artifact repository (idempotent)."""
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository  # noqa: PLC0415
    from mlflow.store.tracking.rest_store import RestStore  # noqa: PLC0415

    if getattr(RestStore, "_pancreas_seg_audited", False):
        return
    create_run, log_metric, log_param, set_tag, log_batch = (
        RestStore.create_run, RestStore.log_metric, RestStore.log_param, RestStore.set_tag, RestStore.log_batch)
    log_artifact = HttpArtifactRepository.log_artifact

    def metric(run_id: str, m: object) -> dict:
        return {"run_id": run_id, "key": m.key, "step": int(m.step), "timestamp": int(m.timestamp),
                "value": None if m.value != m.value else float(m.value)}

    def audited_create_run(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        _record("run", run_id=run.info.run_id, experiment_id=run.info.experiment_id)
        return run

    def audited_log_metric(self, run_id, m):
        log_metric(self, run_id, m)
        _record("metric", **metric(run_id, m))

    def audited_log_param(self, run_id, param):
        log_param(self, run_id, param)
        _record("param", run_id=run_id, key=param.key, value=param.value)

    def audited_set_tag(self, run_id, tag):
        set_tag(self, run_id, tag)
        _record("tag", run_id=run_id, key=tag.key)

    def audited_log_batch(self, run_id, metrics, params, tags):
        log_batch(self, run_id, metrics, params, tags)
        for m in metrics:
            _record("metric", **metric(run_id, m))
        for p in params:
            _record("param", run_id=run_id, key=p.key, value=p.value)
        for t in tags:
            _record("tag", run_id=run_id, key=t.key)

    def audited_log_artifact(self, local_file, artifact_path=None):
        log_artifact(self, local_file, artifact_path)
        name = os.path.basename(local_file)
        _record("artifact", artifact_uri=self.artifact_uri,
                path=f"{artifact_path.strip('/')}/{name}" if artifact_path else name)

    RestStore.create_run, RestStore.log_metric, RestStore.log_param = (
        audited_create_run, audited_log_metric, audited_log_param)
    RestStore.set_tag, RestStore.log_batch = audited_set_tag, audited_log_batch
    HttpArtifactRepository.log_artifact = audited_log_artifact
    RestStore._pancreas_seg_audited = True


def install_as_sitecustomize(folder: Path) -> Path:
    """Copy this module to ``folder/sitecustomize.py`` (put ``folder`` first on ``PYTHONPATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, folder / "sitecustomize.py")
    return folder


def read(folder: Path) -> dict[str, object]:
    """Everything recorded under ``folder``: ``runs`` {run id: experiment id}, ``params`` {run id:
    {key: value}}, ``metrics`` {run id: {key: set of (step, timestamp, value)}}, ``artifacts``
    {artifact URI: set of paths}, ``processes`` (how many processes recorded anything)."""
    runs: dict[str, str] = {}
    params: dict[str, dict[str, str]] = defaultdict(dict)
    metrics: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    artifacts: dict[str, set[str]] = defaultdict(set)
    files = sorted(Path(folder).glob("*.jsonl"))
    for path in files:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["kind"] == "run":
                runs[entry["run_id"]] = entry["experiment_id"]
            elif entry["kind"] == "param":
                params[entry["run_id"]][entry["key"]] = entry["value"]
            elif entry["kind"] == "metric":
                metrics[entry["run_id"]][entry["key"]].add((entry["step"], entry["timestamp"], entry["value"]))
            elif entry["kind"] == "artifact":
                artifacts[entry["artifact_uri"]].add(entry["path"])
    return {"runs": runs, "params": params, "metrics": metrics, "artifacts": artifacts, "processes": len(files)}


if __name__ == "sitecustomize" and os.environ.get(AUDIT_ENV):
    try:
        install()
    except Exception as error:  # noqa: BLE001 - a broken audit must not hide the process' own failure
        _record("audit_error", error=repr(error))
