"""The study's storage: an Optuna journal file that parallel processes share and that survives ``kill -9``.

* **Journal file** (``<storage_dir>/<architecture>.optuna.log``): Optuna's ``JournalStorage`` on a
  ``JournalFileBackend``. Every change is one appended JSON line (written under a lock file and
  ``fsync``-ed), so several processes can add trials at once, and a process killed at any moment
  leaves every completed operation readable. ``optuna-dashboard <file>`` and ``optuna.load_study``
  read it as it is.
* **Heartbeats**: Optuna's journal storage has none, so :class:`HeartbeatJournalStorage` adds
  Optuna's own heartbeat interface (``BaseHeartbeat``) to it. While a trial runs, Optuna's heartbeat
  thread calls :meth:`~HeartbeatJournalStorage.record_heartbeat`, which rewrites
  ``<file>.heartbeats/<trial_id>.json`` (host, process id, time). A RUNNING trial is *stale* when
  the process that runs it is gone (same host: immediately) or its heartbeat is older than
  ``grace_period_s`` (any host). ``study.optimize`` fails stale trials before each new trial
  (``optuna.storages.fail_stale_trials``) and :func:`recover_stale_trials` does it when a study
  starts; the stale-trial callback (Optuna's ``RetryHeartbeatStaleTrialCallback``) queues each one
  again with the same parameters, so a killed trial is retried, not lost.
* **Claim lock** (``<file>.claim.lock``, ``fcntl.flock``): held from "does the study still need a
  trial?" until that trial exists, so parallel workers start exactly ``n_trials`` trials. The
  kernel drops it when its holder dies.
* **Study fingerprint**: the settings a study's trials are comparable under (search space, trial
  settings, data) are stored in the study; :func:`open_study` refuses to continue a study made
  with other ones and names what differs.
* **Or a database** (``tuning.storage``: ``postgresql+psycopg://...``, a lab's shared server;
  docs/team.md): Optuna's ``RDBStorage`` with its own heartbeats (:class:`HeartbeatRDBStorage`
  adds the same-host "worker process gone" check), and the claim is a PostgreSQL advisory lock
  (:class:`AdvisoryClaim`), which the server drops when its holder's connection dies, so workers
  on several hosts share one study. ``sqlite:///<file>`` works too (claim: a lock file beside it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat  # the interface study.optimize checks for
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from pancreas_seg.core.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

DIRECTION = "maximize"
#: Study user attribute holding the settings its trials are comparable under.
FINGERPRINT_ATTR = "pancreas_seg_fingerprint"
SETTINGS_ATTR = "pancreas_seg_settings"
#: Trial states that count toward ``n_trials``.
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


class StudySettingsMismatchError(ValueError):
    """The study in the storage was made with other settings than the ones asked for now."""


def heartbeat_dir(storage_path: Path | str) -> Path:
    return Path(f"{storage_path}.heartbeats")


def process_alive(pid: int) -> bool:
    """True while process ``pid`` of this host exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """``JournalStorage`` on a journal file, with heartbeats in a side folder (see the module docstring).

    Args:
        path: the journal file (created with its folder if missing).
        heartbeat_interval_s: seconds between heartbeats of a running trial.
        grace_period_s: a heartbeat older than this marks its trial stale.
        stale_trial_callback: called with each trial this process failed as stale.
    """

    def __init__(self, path: Path | str, heartbeat_interval_s: int = 10, grace_period_s: int = 60,
                 stale_trial_callback: StaleTrialCallback | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(self.path)))
        self.heartbeat_dir = heartbeat_dir(self.path)
        self.heartbeat_dir.mkdir(exist_ok=True)
        self._interval = int(heartbeat_interval_s)
        self._grace = float(grace_period_s)
        self._callback = stale_trial_callback
        self._host = socket.gethostname()

    # ---- optuna.storages._heartbeat.BaseHeartbeat
    def record_heartbeat(self, trial_id: int) -> None:
        record = {"host": self._host, "pid": os.getpid(), "time": time.time()}
        atomic_write_bytes(self.heartbeat_dir / f"{trial_id}.json", json.dumps(record).encode())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        beats = {p.stem: p for p in self.heartbeat_dir.glob("*.json")}
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        stale = [t._trial_id for t in running if self.stale_reason(t) is not None]
        running_ids = {str(t._trial_id) for t in running}
        for trial_id, path in beats.items():   # trials finished since: their heartbeats are done
            if trial_id not in running_ids:
                path.unlink(missing_ok=True)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> StaleTrialCallback | None:
        return self._callback

    # ---- liveness
    def stale_reason(self, trial: FrozenTrial) -> str | None:
        """Why RUNNING ``trial`` is stale, or None while it is alive."""
        now = time.time()
        path = self.heartbeat_dir / f"{trial._trial_id}.json"
        try:
            record, beat_time = json.loads(path.read_text()), path.stat().st_mtime
        except (OSError, ValueError):
            record = None
        if record is None:  # no heartbeat yet: the trial's start time is its last sign of life
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            return (f"no heartbeat {now - started:.0f} s after it started (grace period {self._grace:.0f} s)"
                    if now - started > self._grace else None)
        if record.get("host") == self._host and not process_alive(int(record.get("pid", -1))):
            return f"its worker process {record.get('pid')} on {self._host} is gone"
        if now - beat_time > self._grace:
            return (f"last heartbeat {now - beat_time:.0f} s ago from process {record.get('pid')} on "
                    f"{record.get('host')} (grace period {self._grace:.0f} s)")
        return None


def retry_stale_trials(max_retry: int | None) -> StaleTrialCallback:
    """Optuna's ``RetryHeartbeatStaleTrialCallback``: a stale trial is queued again (same params)."""
    with warnings.catch_warnings():  # experimental since Optuna 2.8, still in 5.0; pinned in pyproject
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


#: Trial system attribute where :class:`HeartbeatRDBStorage` records a trial's worker (host, pid).
WORKER_ATTR = "pancreas_seg:worker"
#: Database URL schemes a study may live in (psycopg 3's SQLAlchemy dialect; sqlite for one host).
DATABASE_SCHEMES = ("postgresql+psycopg", "sqlite")


def is_database_url(location: Path | str) -> bool:
    """True when ``location`` is a database URL (``scheme://...``), False for a journal file path."""
    return "://" in str(location)


def check_database_url(url: str) -> None:
    """Refuse a URL scheme the claim lock cannot cover, naming what works."""
    scheme = url.partition("://")[0]
    if scheme not in DATABASE_SCHEMES:
        hint = " (write postgresql+psycopg://: plain postgresql:// means psycopg2, not installed)" \
            if scheme == "postgresql" else ""
        raise ValueError(f"Optuna storage {describe_storage(url)}: scheme {scheme!r} is not supported{hint}; "
                         f"use one of {[s + '://' for s in DATABASE_SCHEMES]} or a journal file")


def describe_storage(location: Path | str) -> str:
    """``location`` for logs, tags and messages: a file path as is, a URL without its password."""
    location = str(location)
    if not is_database_url(location):
        return location
    scheme, _, rest = location.partition("://")
    credentials, at, host = rest.partition("@")
    if not at:
        return location
    return f"{scheme}://{credentials.partition(':')[0]}{':***' if ':' in credentials else ''}@{host}"


class HeartbeatRDBStorage(RDBStorage):
    """Optuna's ``RDBStorage`` with heartbeats, plus the journal storage's same-host check: the first
    heartbeat of a trial records its worker's host and process id (:data:`WORKER_ATTR`), and a
    RUNNING trial whose worker on this host is gone is stale at once, not only after
    ``grace_period_s`` (Optuna's own rule, which covers other hosts)."""

    def __init__(self, url: str, heartbeat_interval_s: int = 10, grace_period_s: int = 60,
                 stale_trial_callback: StaleTrialCallback | None = None) -> None:
        check_database_url(url)
        with warnings.catch_warnings():   # heartbeat_interval is experimental in Optuna 5.0
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(url, engine_kwargs={"pool_pre_ping": True},   # reconnect after a server restart
                             heartbeat_interval=int(heartbeat_interval_s), grace_period=int(grace_period_s),
                             heartbeat_stale_trial_callback=stale_trial_callback)
        self.path = describe_storage(url)   # what messages name
        self._host = socket.gethostname()
        self._recorded: set[int] = set()

    def record_heartbeat(self, trial_id: int) -> None:
        if trial_id not in self._recorded:
            self.set_trial_system_attr(trial_id, WORKER_ATTR, {"host": self._host, "pid": os.getpid()})
            self._recorded.add(trial_id)
        super().record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = set(super()._get_stale_trial_ids(study_id))
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.system_attrs.get(WORKER_ATTR) or {}
            if worker.get("host") == self._host and not process_alive(int(worker.get("pid", -1))):
                stale.add(trial._trial_id)
        return sorted(stale)

    def stale_reason(self, trial: FrozenTrial) -> str | None:
        """Why RUNNING ``trial`` is stale by the same-host rule (None: alive, or judged by Optuna's
        heartbeat age, which :meth:`_get_stale_trial_ids` applies)."""
        worker = trial.system_attrs.get(WORKER_ATTR) or {}
        if worker.get("host") == self._host and not process_alive(int(worker.get("pid", -1))):
            return f"its worker process {worker.get('pid')} on {self._host} is gone"
        return None


def open_storage(path: Path | str, heartbeat_interval_s: int = 10, grace_period_s: int = 60,
                 stale_trial_callback: StaleTrialCallback | None = None) -> HeartbeatJournalStorage | HeartbeatRDBStorage:
    """The study storage at ``path``: a journal file, or a database URL (:func:`is_database_url`)."""
    if is_database_url(path):
        return HeartbeatRDBStorage(str(path), heartbeat_interval_s, grace_period_s, stale_trial_callback)
    return HeartbeatJournalStorage(path, heartbeat_interval_s, grace_period_s, stale_trial_callback)


def load_storage(path: Path | str) -> JournalStorage | RDBStorage:
    """The storage at ``path`` for reading a finished study (no heartbeats, nothing created)."""
    if is_database_url(path):
        check_database_url(str(path))
        return RDBStorage(str(path), engine_kwargs={"pool_pre_ping": True})
    return JournalStorage(JournalFileBackend(str(path)))


def fingerprint(settings: Mapping[str, Any]) -> str:
    payload = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                found.append(f"{name}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
            else:
                found.extend(_differences(old[key], new[key], name))
        return found
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def open_study(storage: JournalStorage, study_name: str, settings: Mapping[str, Any],
               sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study, or continue it if it was made with the same ``settings``.

    ``settings`` (JSON-able) are what makes its trials comparable. Raises
    :class:`StudySettingsMismatchError` naming the differing keys otherwise.
    """
    settings = json.loads(json.dumps(settings, default=str))   # what the storage gives back
    study = optuna.create_study(storage=storage, study_name=study_name, direction=DIRECTION,
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint(settings))
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif stored != fingerprint(settings):
        differences = _differences(study.user_attrs.get(SETTINGS_ATTR, {}), settings)
        path = getattr(storage, "path", "the storage")
        remedy = (f"Delete the study (optuna delete-study --study-name {study_name} --storage <url>) or use "
                  f"another database" if isinstance(storage, RDBStorage)
                  else f"Delete {path} (and {heartbeat_dir(path).name}/)")
        raise StudySettingsMismatchError(
            f"study {study_name!r} in {path} was made with other settings, so its trials are not "
            f"comparable with new ones: {'; '.join(differences[:12]) or 'fingerprint differs'}. "
            f"{remedy} to start a new study, or restore the settings.")
    return study


def trial_counts(study: optuna.Study) -> Counter[str]:
    """Number of trials per state name (``COMPLETE``, ``PRUNED``, ``RUNNING``, ``FAIL``, ``WAITING``)."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def trials_to_start(study: optuna.Study, n_trials: int) -> int:
    """How many more trials must start for COMPLETE + PRUNED to reach ``n_trials`` (running ones
    are assumed to finish; failed ones do not count)."""
    counts = trial_counts(study)
    return n_trials - counts["COMPLETE"] - counts["PRUNED"] - counts["RUNNING"]


def recover_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the study's stale RUNNING trials now (and run the storage's stale-trial callback,
    which queues them again); returns their numbers."""
    storage = study._storage
    if isinstance(storage, _CachedStorage):   # what optuna.load_study makes of an RDBStorage
        storage = storage._backend
    if not isinstance(storage, (HeartbeatJournalStorage, HeartbeatRDBStorage)):
        return []
    running = storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
    reasons = {t.number: storage.stale_reason(t) for t in running}
    if isinstance(storage, HeartbeatRDBStorage):   # Optuna judges heartbeat age itself
        stale_ids = set(storage._get_stale_trial_ids(study._study_id))
        reasons = {t.number: reasons[t.number] or (f"no heartbeat for over {storage.grace_period} s"
                                                   if t._trial_id in stale_ids else None) for t in running}
    with warnings.catch_warnings():   # fail_stale_trials is experimental since Optuna 2.9, still in 5.0
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if reasons.get(t.number)]
    for number in failed:
        logger.warning("%s: trial %d was interrupted (%s): failed, and queued again with the same "
                       "parameters", study.study_name, number, reasons[number])
    return failed


class Claim:
    """An exclusive ``flock`` on a lock file; :meth:`release` may be called early, and twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def claim_path(storage_path: Path | str) -> Path:
    return Path(f"{storage_path}.claim.lock")


class AdvisoryClaim:
    """A PostgreSQL session-level advisory lock named after the study (its key: the first 8 bytes of
    SHA-256 of ``<database>/<study>``), on a connection of its own: every host that reaches the
    server shares it, and the server drops it when the holder's connection dies (``kill -9``
    included). Same interface as :class:`Claim`."""

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        digest = hashlib.sha256(f"{url.rpartition('/')[2]}/{study_name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self._connection: Any = None
        self._engine: Any = None

    def acquire(self) -> None:
        import sqlalchemy  # noqa: PLC0415
        from sqlalchemy.pool import NullPool  # noqa: PLC0415

        self._engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        self._connection = self._engine.connect()
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})

    def release(self) -> None:
        if self._connection is not None:
            import sqlalchemy  # noqa: PLC0415

            try:
                self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            except Exception as exc:  # noqa: BLE001 - a lost connection has dropped the lock already
                logger.debug("advisory unlock failed (%s): the lock went with the connection", exc)
            finally:
                self._connection.close()
                self._engine.dispose()
                self._connection = self._engine = None

    @property
    def held(self) -> bool:
        return self._connection is not None


def claim_for(storage_path: Path | str, study_name: str) -> Claim | AdvisoryClaim:
    """The claim lock of a study: an advisory lock on PostgreSQL, else a lock file beside the
    journal (or the sqlite database) file."""
    location = str(storage_path)
    if location.startswith("postgresql"):
        return AdvisoryClaim(location, study_name)
    if location.startswith("sqlite:///"):
        return Claim(Path(f"{location.removeprefix('sqlite:///')}.{study_name}.claim.lock"))
    return Claim(claim_path(storage_path))


def optimize_until(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int,
                   storage_path: Path | str, max_consecutive_failures: int = 3,
                   callbacks: list[Callable[..., None]] | None = None) -> int:
    """Run ``objective`` through ``study.optimize``, one trial at a time, until COMPLETE + PRUNED
    trials reach ``n_trials`` (counting the trials other processes run); returns how many trials
    this call ran.

    "Is another trial needed?" and the creation of that trial happen under the claim lock, so
    parallel callers start exactly as many trials as needed. Before each check, stale trials are
    failed and queued again (:func:`recover_stale_trials`); queued (WAITING) trials run first. A
    trial whose objective raises is FAIL (it does not count); after ``max_consecutive_failures``
    of them in a row this call raises ``RuntimeError`` with the last error.
    """
    ran, failures = 0, 0
    while True:
        claim = claim_for(storage_path, study.study_name)
        claim.acquire()
        started: list[int] = []
        try:
            recover_stale_trials(study)
            if trials_to_start(study, n_trials) <= 0:
                return ran

            def claimed(trial: optuna.Trial, claim: Claim | AdvisoryClaim = claim, started: list[int] = started) -> float:
                started.append(trial._trial_id)
                claim.release()   # the trial exists (RUNNING): other workers count it from now on
                return objective(trial)

            study.optimize(claimed, n_trials=1, callbacks=callbacks, catch=(Exception,), gc_after_trial=True)
        finally:
            claim.release()
        ran += 1
        trial = study._storage.get_trial(started[0]) if started else None
        if trial is not None and trial.state == TrialState.FAIL:
            failures += 1
            if failures >= max_consecutive_failures:
                raise RuntimeError(f"{failures} trials in a row failed in this worker; the last, trial "
                                   f"{trial.number}: {trial.user_attrs.get('error', 'see the log above')}")
        else:
            failures = 0
