"""Copy an MLflow store (a project's ``sqlite:///mlflow.db``) into the lab's tracking server (no Kedro)::

    PGPASSWORD=... python -m pancreas_seg.tracking.migrate --source sqlite:///mlflow.db \\
        --destination http://127.0.0.1:5000

What is copied, through the public ``MlflowClient`` API of both stores:

* every active experiment (by name; created with its tags when missing),
* every run, parents before their nested runs: name, start and end time, status, tags (the
  parent link re-pointed at the copy), params, the FULL history of every metric (each step,
  timestamp and value), and its artifacts (downloaded, then uploaded through the server),
* every MLflow 3 logged model (``models:/m-...``, the pyfunc "segmenter"): name, params, tags, its
  artifacts, READY, and the run output link,
* every registered model with its versions (in version order, tags, description, source re-pointed
  at the copied logged model or run) and its aliases (``champion``); an alias the destination
  already has on another version is kept (with a warning) unless ``--overwrite-aliases``.

Not copied: dataset inputs, traces and prompts (this project logs none), and metrics attached to
a logged model rather than a run. Run and model ids are new (the server makes them); every copy is
tagged ``migrated_from=<source run/model id>``, so running the command again skips what is there
and copies only what is new. Version numbers follow the destination's (1, 2, ... in a new server).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, ViewType
from mlflow.entities.logged_model_output import LoggedModelOutput

logger = logging.getLogger(__name__)

MIGRATED_TAG = "migrated_from"
BATCH = 1000        # metrics per log_batch (MLflow's limit)
PARAM_BATCH = 100   # params / tags per log_batch
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class MigrationReport:
    experiments: int = 0
    runs: int = 0
    runs_skipped: int = 0
    params: int = 0
    metric_steps: int = 0
    artifacts: int = 0
    logged_models: int = 0
    model_versions: int = 0
    aliases: int = 0
    aliases_kept: int = 0   # destination aliases left where they were (no --overwrite-aliases)
    run_ids: dict[str, str] = field(default_factory=dict)      # source run id -> destination run id
    model_ids: dict[str, str] = field(default_factory=dict)    # source logged model id -> destination

    def summary(self) -> str:
        return (f"{self.experiments} experiment(s), {self.runs} run(s) copied ({self.runs_skipped} already there), "
                f"{self.params} params, {self.metric_steps} metric steps, {self.artifacts} artifact files, "
                f"{self.logged_models} logged model(s), {self.model_versions} model version(s), {self.aliases} alias(es) "
                f"set, {self.aliases_kept} kept")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _all_runs(client: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _parents_first(runs: list) -> list:
    """Runs ordered so that every parent precedes its nested runs (then by start time)."""
    by_id = {r.info.run_id: r for r in runs}

    def depth(run) -> int:
        seen, level = set(), 0
        while (parent := run.data.tags.get(PARENT_TAG)) in by_id and parent not in seen:
            seen.add(parent)
            run, level = by_id[parent], level + 1
        return level

    return sorted(runs, key=lambda r: (depth(r), r.info.start_time or 0))


def _copy_artifacts(download: Callable[[str], str], upload: Callable[[str], None], report: MigrationReport) -> None:
    with tempfile.TemporaryDirectory(prefix="pancreas_seg_migrate_") as folder:
        local = Path(download(folder))
        files = [p for p in local.rglob("*") if p.is_file()]
        if files:
            upload(str(local))
            report.artifacts += len(files)


def migrate(source_uri: str, destination_uri: str, experiments: Sequence[str] | None = None,
            overwrite_aliases: bool = False) -> MigrationReport:
    """Copy ``source_uri``'s experiments (all, or those named), runs, logged models and registry into
    ``destination_uri`` (see the module docstring); returns what was copied.

    An alias the destination already has on another version (the lab's ``champion``) is kept, with
    a warning, unless ``overwrite_aliases``."""
    source = MlflowClient(tracking_uri=source_uri, registry_uri=source_uri)
    target = MlflowClient(tracking_uri=destination_uri, registry_uri=destination_uri)
    report = MigrationReport()
    for experiment in source.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        if experiments and experiment.name not in experiments:
            continue
        _migrate_experiment(source, target, source_uri, experiment, report)
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(destination_uri)   # a sqlalchemy registry resolves models:/ through the global store
    try:
        _migrate_registry(source, target, report, overwrite_aliases)
    finally:
        mlflow.set_tracking_uri(saved)
    return report


def _migrate_experiment(source: MlflowClient, target: MlflowClient, source_uri: str, experiment,
                        report: MigrationReport) -> None:
    existing = target.get_experiment_by_name(experiment.name)
    experiment_id = existing.experiment_id if existing else target.create_experiment(
        experiment.name, tags={k: v for k, v in experiment.tags.items()})
    report.experiments += 1
    done = {r.data.tags[MIGRATED_TAG]: r.info.run_id for r in _all_runs(target, experiment_id)
            if MIGRATED_TAG in r.data.tags}
    for run in _parents_first(_all_runs(source, experiment.experiment_id)):
        old_id = run.info.run_id
        if old_id in done:   # copied by an earlier call: remember its ids for the registry
            report.run_ids[old_id] = done[old_id]
            for model in target.search_logged_models([experiment_id], filter_string=f"source_run_id = '{done[old_id]}'"):
                if MIGRATED_TAG in model.tags:
                    report.model_ids[model.tags[MIGRATED_TAG]] = model.model_id
            report.runs_skipped += 1
            continue
        tags = {k: v for k, v in run.data.tags.items() if k != PARENT_TAG}
        if PARENT_TAG in run.data.tags:
            tags[PARENT_TAG] = report.run_ids.get(run.data.tags[PARENT_TAG], run.data.tags[PARENT_TAG])
        tags[MIGRATED_TAG] = old_id
        new = target.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
        new_id = new.info.run_id
        report.run_ids[old_id] = new_id
        params = [Param(k, v) for k, v in run.data.params.items()]
        for chunk in _chunks(params, PARAM_BATCH):
            target.log_batch(new_id, params=chunk, synchronous=True)
        report.params += len(params)
        history: list[Metric] = []
        for key in run.data.metrics:
            history.extend(Metric(m.key, m.value, m.timestamp, m.step) for m in source.get_metric_history(old_id, key))
        for chunk in _chunks(history, BATCH):
            target.log_batch(new_id, metrics=chunk, synchronous=True)
        report.metric_steps += len(history)
        _copy_artifacts(
            lambda folder, old_id=old_id: mlflow.artifacts.download_artifacts(
                run_id=old_id, artifact_path="", dst_path=folder, tracking_uri=source_uri),
            lambda local, new_id=new_id: target.log_artifacts(new_id, local), report)
        _migrate_logged_models(source, target, source_uri, run, experiment_id, new_id, report)
        target.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
        report.runs += 1
        logger.info("run %s (%s) -> %s", old_id, run.info.run_name, new_id)


def _migrate_logged_models(source: MlflowClient, target: MlflowClient, source_uri: str, run, experiment_id: str,
                           new_run_id: str, report: MigrationReport) -> None:
    models = source.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    outputs = {o.model_id: o.step for o in (run.outputs.model_outputs if run.outputs else [])}
    for model in models:
        copy = target.create_logged_model(experiment_id, name=model.name, source_run_id=new_run_id,
                                          tags={**model.tags, MIGRATED_TAG: model.model_id},
                                          params=dict(model.params), model_type=model.model_type)
        _copy_artifacts(
            lambda folder, model=model: mlflow.artifacts.download_artifacts(
                artifact_uri=model.artifact_location, dst_path=folder, tracking_uri=source_uri),
            lambda local, copy=copy: target.log_model_artifacts(copy.model_id, local), report)
        target.finalize_logged_model(copy.model_id, "READY")
        if model.model_id in outputs:
            target.log_outputs(new_run_id, [LoggedModelOutput(copy.model_id, outputs[model.model_id])])
        report.model_ids[model.model_id] = copy.model_id
        report.logged_models += 1


def _migrate_registry(source: MlflowClient, target: MlflowClient, report: MigrationReport,
                      overwrite_aliases: bool = False) -> None:
    for registered in source.search_registered_models(max_results=1000):
        try:
            target.get_registered_model(registered.name)
        except mlflow.exceptions.MlflowException:
            target.create_registered_model(registered.name, tags=dict(registered.tags),
                                           description=registered.description)
        done = {v.tags.get(MIGRATED_TAG): v.version for v in target.search_model_versions(f"name = '{registered.name}'")}
        numbers: dict[str, str] = {}
        versions = sorted(source.search_model_versions(f"name = '{registered.name}'"), key=lambda v: int(v.version))
        for version in versions:
            key = f"{registered.name}/{version.version}"
            if key in done:
                numbers[str(version.version)] = str(done[key])
                continue
            old_model = version.model_id or (version.source.removeprefix("models:/")
                                             if version.source.startswith("models:/m-") else "")
            model_id = report.model_ids.get(old_model)
            source_uri = f"models:/{model_id}" if model_id else version.source
            for old, new in report.run_ids.items():
                source_uri = source_uri.replace(old, new)
            copy = target.create_model_version(
                registered.name, source_uri, run_id=report.run_ids.get(version.run_id, None),
                tags={**version.tags, MIGRATED_TAG: key}, description=version.description, model_id=model_id)
            numbers[str(version.version)] = str(copy.version)
            report.model_versions += 1
        for alias, version in (registered.aliases or {}).items():
            version = str(version)
            if version not in numbers:
                continue
            try:
                current = target.get_model_version_by_alias(registered.name, alias).version
            except mlflow.exceptions.MlflowException:
                current = None
            if current is not None and str(current) != str(numbers[version]) and not overwrite_aliases:
                logger.warning("%s@%s stays on version %s in the destination (the copy of source version %s is "
                               "version %s; --overwrite-aliases moves it)", registered.name, alias, current,
                               version, numbers[version])
                report.aliases_kept += 1
                continue
            target.set_registered_model_alias(registered.name, alias, numbers[version])
            report.aliases += 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pancreas_seg.tracking.migrate",
                                     description="Copy an MLflow store (sqlite:///mlflow.db) into the lab's server "
                                                 "(docs/team.md).")
    parser.add_argument("--source", default="sqlite:///mlflow.db", help="the store to copy (default: %(default)s)")
    parser.add_argument("--destination", required=True, help="the lab's tracking server, http://host:port")
    parser.add_argument("--experiment", action="append", default=None,
                        help="copy only this experiment (repeatable; default: all active ones)")
    parser.add_argument("--overwrite-aliases", action="store_true",
                        help="move the destination's aliases (champion) to the copied versions; default: keep them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = migrate(args.source, args.destination, args.experiment, args.overwrite_aliases)
    print(f"migrated {args.source} -> {args.destination}: {report.summary()}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
