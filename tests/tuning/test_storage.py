"""The study storage with real Optuna journal files and real processes: a trial whose process is
killed with SIGKILL mid-trial is failed and retried with the same parameters when the study is
resumed, and the study still reaches ``n_trials``; heartbeats age out for workers on other hosts;
parallel processes start exactly ``n_trials`` trials; a study made with other settings is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pancreas_seg.tuning.storage import (
    StudySettingsMismatchError,
    heartbeat_dir,
    open_storage,
    open_study,
    optimize_until,
    recover_stale_trials,
    retry_stale_trials,
    trial_counts,
)

SRC = Path(__file__).resolve().parents[2] / "src"

# argv: storage path, marker folder, n_trials, seconds per trial. Each trial writes
# <marker>/started-<number> and records this process's pid as a user attribute.
WORKER = r'''
import os, sys, time
from pathlib import Path

import optuna

from pancreas_seg.tuning.storage import open_storage, optimize_until, retry_stale_trials

path, markers, n_trials, seconds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
storage = open_storage(path, heartbeat_interval_s=1, grace_period_s=30, stale_trial_callback=retry_stale_trials(2))
study = optuna.load_study(study_name="study", storage=storage, sampler=optuna.samplers.RandomSampler(seed=os.getpid()))

def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("pid", os.getpid())
    (markers / f"started-{trial.number}").write_text(str(os.getpid()))
    time.sleep(seconds)
    return x

print("RAN", optimize_until(study, objective, n_trials, path), flush=True)
'''


def _worker(path: Path, markers: Path, n_trials: int, seconds: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(markers), str(n_trials), str(seconds)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def _storage(path: Path):
    return open_storage(path, heartbeat_interval_s=1, grace_period_s=30, stale_trial_callback=retry_stale_trials(2))


@pytest.mark.subprocess
def test_a_trial_killed_mid_run_is_failed_retried_and_the_study_completes(tmp_path: Path) -> None:
    path, markers = tmp_path / "study.optuna.log", tmp_path / "markers"
    markers.mkdir()
    open_study(_storage(path), "study", {"space": "x"})
    worker = _worker(path, markers, n_trials=3, seconds=600)   # its first trial would run 10 minutes
    try:
        _wait_for(lambda: (markers / "started-0").exists() and (heartbeat_dir(path) / "0.json").exists())
        beat = json.loads((heartbeat_dir(path) / "0.json").read_text())
        assert beat["pid"] == worker.pid           # Optuna's heartbeat thread writes through our storage
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(timeout=30)

    storage = _storage(path)
    study = optuna.load_study(study_name="study", storage=storage)
    [killed] = study.get_trials(deepcopy=False)
    assert killed.state == TrialState.RUNNING          # what the killed process left behind
    assert recover_stale_trials(study) == [0]          # its process is gone: stale at once, no grace wait
    failed, queued = study.get_trials(deepcopy=False)
    assert failed.state == TrialState.FAIL
    assert queued.state == TrialState.WAITING and queued.params == killed.params
    assert queued.system_attrs["failed_trial"] == 0

    # resume in a new process: the queued retry runs first, and the study reaches n_trials
    resumed = _worker(path, markers, n_trials=3, seconds=0.05)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    assert "RAN 3" in out
    study = optuna.load_study(study_name="study", storage=_storage(path))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[1].params == killed.params and trials[1].system_attrs["failed_trial"] == 0
    assert trials[1].user_attrs["pid"] == resumed.pid
    assert trial_counts(study)["COMPLETE"] == 3
    assert not list(heartbeat_dir(path).glob("*.json"))   # finished trials leave no heartbeat behind


def test_heartbeats_of_a_worker_elsewhere_age_out(tmp_path: Path) -> None:
    path = tmp_path / "study.optuna.log"
    storage = open_storage(path, heartbeat_interval_s=1, grace_period_s=5)
    study = open_study(storage, "study", {})
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    assert storage.stale_reason(frozen) is None                    # just started, no heartbeat yet
    storage.record_heartbeat(trial._trial_id)
    assert storage.stale_reason(frozen) is None                    # this live process
    beat_file = heartbeat_dir(path) / f"{trial._trial_id}.json"
    beat = json.loads(beat_file.read_text())
    beat_file.write_text(json.dumps({**beat, "host": "another-host", "pid": 1}))
    assert storage.stale_reason(frozen) is None                    # fresh heartbeat from elsewhere
    old = time.time() - 60
    os.utime(beat_file, (old, old))
    assert "last heartbeat 60 s ago" in storage.stale_reason(frozen)
    assert recover_stale_trials(study) == [0]
    assert study.get_trials(deepcopy=False)[0].state == TrialState.FAIL   # no retry callback given


@pytest.mark.subprocess
def test_parallel_processes_start_exactly_n_trials(tmp_path: Path) -> None:
    path, markers = tmp_path / "study.optuna.log", tmp_path / "markers"
    markers.mkdir()
    open_study(_storage(path), "study", {})
    workers = [_worker(path, markers, n_trials=5, seconds=0.4) for _ in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    study = optuna.load_study(study_name="study", storage=_storage(path))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}   # both worked
    ran = sorted(int(out.split("RAN ")[1]) for out, _ in outputs)
    assert sum(ran) == 5


def test_failing_trials_stop_a_worker_and_do_not_count(tmp_path: Path) -> None:
    path = tmp_path / "study.optuna.log"
    study = open_study(_storage(path), "study", {})

    def broken(trial: optuna.Trial) -> float:
        trial.set_user_attr("error", "ValueError: broken on purpose")
        raise ValueError("broken on purpose")

    with pytest.raises(RuntimeError, match="3 trials in a row failed in this worker; the last, trial 2: "
                                           "ValueError: broken on purpose"):
        optimize_until(study, broken, n_trials=5, storage_path=path)
    assert trial_counts(study) == {"FAIL": 3}


def test_a_study_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unet.optuna.log"
    settings = {"search_space": ["learning_rate: float log-uniform in [0.0003, 0.01]"], "trial": {"epochs": 4}}
    open_study(_storage(path), "unet", settings)
    assert open_study(_storage(path), "unet", settings).study_name == "unet"   # same settings: continued
    changed = {**settings, "trial": {"epochs": 6}}
    with pytest.raises(StudySettingsMismatchError, match=r"trial\.epochs: 4 -> 6.*Delete .*unet\.optuna\.log"):
        open_study(_storage(path), "unet", changed)
