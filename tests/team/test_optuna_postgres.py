"""Optuna studies in the lab's PostgreSQL (``tuning.storage``), with real processes: two workers
share one study and start exactly ``n_trials`` trials between them (the claim is a PostgreSQL
advisory lock); a trial whose worker is killed with ``kill -9`` is failed and retried with the same
parameters, at once on the same host and after ``grace_period_s`` from elsewhere; the ``env:``
form of ``tuning.storage`` reads the URL from the environment and says which variable is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from benchmarks.support.team_stack import TeamStack
from pancreas_seg.tuning.config import resolve_storage
from pancreas_seg.tuning.search_space import SearchSpaceError
from pancreas_seg.tuning.storage import (
    WORKER_ATTR,
    AdvisoryClaim,
    HeartbeatRDBStorage,
    describe_storage,
    open_storage,
    open_study,
    recover_stale_trials,
    retry_stale_trials,
    trial_counts,
)

pytestmark = [pytest.mark.postgres, pytest.mark.subprocess]

# argv: storage URL, study name, n_trials, seconds per trial. Each trial records the worker's pid.
WORKER = r'''
import os, sys, time
import optuna
from pancreas_seg.tuning.storage import open_storage, optimize_until, retry_stale_trials

url, name, n_trials, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
storage = open_storage(url, heartbeat_interval_s=1, grace_period_s=30, stale_trial_callback=retry_stale_trials(2))
study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=os.getpid()))

def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("pid", os.getpid())
    print("STARTED", trial.number, flush=True)
    time.sleep(seconds)
    return x

print("RAN", optimize_until(study, objective, n_trials, url), flush=True)
'''


def _worker(team: TeamStack, name: str, n_trials: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WORKER, team.optuna_url, name, str(n_trials), str(seconds)],
                            env=team.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _storage(team: TeamStack, grace_s: int = 30) -> HeartbeatRDBStorage:
    os.environ.update(team.postgres.environment())   # libpq reads PGPASSWORD in this process too
    return open_storage(team.optuna_url, heartbeat_interval_s=1, grace_period_s=grace_s,
                        stale_trial_callback=retry_stale_trials(2))


def _wait_for(predicate, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def test_two_workers_share_one_study_and_start_exactly_n_trials(team: TeamStack) -> None:
    name = f"shared-{uuid.uuid4().hex[:8]}"
    open_study(_storage(team), name, {"space": "x"})
    workers = [_worker(team, name, n_trials=6, seconds=0.5) for _ in range(2)]
    outputs = [w.communicate(timeout=240) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-3000:] for _, err in outputs]
    study = optuna.load_study(study_name=name, storage=_storage(team))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6          # not 7: the claim held
    assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}   # both worked
    assert sum(int(out.split("RAN ")[1]) for out, _ in outputs) == 6


def test_a_worker_killed_with_sigkill_has_its_trial_retried(team: TeamStack) -> None:
    name = f"killed-{uuid.uuid4().hex[:8]}"
    storage = _storage(team)
    open_study(storage, name, {"space": "x"})
    worker = _worker(team, name, n_trials=3, seconds=600)   # its first trial would run 10 minutes
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        _wait_for(lambda: any(WORKER_ATTR in t.system_attrs for t in study.get_trials(deepcopy=False)))
        [running] = study.get_trials(deepcopy=False)
        assert running.state == TrialState.RUNNING and running.system_attrs[WORKER_ATTR]["pid"] == worker.pid
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(timeout=30)

    study = optuna.load_study(study_name=name, storage=_storage(team))
    assert recover_stale_trials(study) == [0]           # same host, process gone: stale at once
    failed, queued = study.get_trials(deepcopy=False)
    assert failed.state == TrialState.FAIL
    assert queued.state == TrialState.WAITING and queued.params == running.params
    assert queued.system_attrs["failed_trial"] == 0

    resumed = _worker(team, name, n_trials=3, seconds=0.1)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert "RAN 3" in out
    trials = optuna.load_study(study_name=name, storage=_storage(team)).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[1].params == running.params and trials[1].user_attrs["pid"] == resumed.pid


def test_a_silent_worker_elsewhere_is_stale_after_the_grace_period(team: TeamStack) -> None:
    name = f"elsewhere-{uuid.uuid4().hex[:8]}"
    storage = _storage(team, grace_s=2)
    study = open_study(storage, name, {})
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, {"host": "another-host", "pid": 1})
    assert recover_stale_trials(study) == []             # a fresh heartbeat from another host
    time.sleep(3.5)
    assert recover_stale_trials(study) == [0]            # no heartbeat for over 2 s
    assert trial_counts(study) == {"FAIL": 1, "WAITING": 1}


def test_the_advisory_claim_excludes_a_second_holder(team: TeamStack) -> None:
    _storage(team)
    first, second = AdvisoryClaim(team.optuna_url, "s"), AdvisoryClaim(team.optuna_url, "s")
    first.acquire()
    with team.postgres.connect("optuna") as connection:   # another session cannot take it meanwhile
        assert connection.execute("SELECT pg_try_advisory_lock(%s)", (first.key,)).fetchone()[0] is False
    first.release()
    second.acquire()
    assert second.held
    second.release()


def test_the_storage_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PANCREAS_SEG_OPTUNA_STORAGE", raising=False)
    with pytest.raises(SearchSpaceError, match="environment variable PANCREAS_SEG_OPTUNA_STORAGE is not set"):
        resolve_storage("env:PANCREAS_SEG_OPTUNA_STORAGE")
    monkeypatch.setenv("PANCREAS_SEG_OPTUNA_STORAGE", "postgresql+psycopg://u:secret@db:5432/optuna")
    url = resolve_storage("env:PANCREAS_SEG_OPTUNA_STORAGE")
    assert url.endswith("@db:5432/optuna") and "secret" not in describe_storage(url)
    assert resolve_storage(None) is None
    with pytest.raises(ValueError, match="postgresql\\+psycopg"):
        open_storage("postgresql://u@db/optuna")
