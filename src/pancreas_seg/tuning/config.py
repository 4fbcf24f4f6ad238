"""``TuningConfig``: the ``tuning`` parameters of one architecture, validated.

``tuning`` holds the settings shared by every architecture; ``tuning.architectures.<name>`` is
deep-merged over them for one architecture (e.g. the FCN's lower learning-rate range). Errors name
the configuration key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pancreas_seg.learning.setup import merge_settings
from pancreas_seg.tuning.search_space import SearchSpace, SearchSpaceError

#: Keys of ``tuning`` (per architecture after the merge); anything else is a typo.
KNOWN_KEYS = {"n_trials", "n_workers", "threads_per_worker", "pin_cores", "storage_dir", "storage", "seed", "sampler", "pruner",
              "heartbeat_interval_s", "grace_period_s", "max_retry", "trial", "search_space", "architectures",
              "importance_evaluator"}
SAMPLER_KEYS = {"n_startup_trials", "constant_liar", "multivariate"}
PRUNER_KEYS = {"n_startup_trials", "n_warmup_steps", "interval_steps"}
#: ``importance_evaluator`` values (``optuna.importance``; see :mod:`pancreas_seg.tuning.importance`).
IMPORTANCE_EVALUATORS = ("fanova", "ped_anova")
#: ``tuning.storage: env:<VARIABLE>`` reads the database URL from that environment variable at run time.
ENV_PREFIX = "env:"


def resolve_storage(value: str | None, key: str = "tuning.storage") -> str | None:
    """``tuning.storage`` as a URL: None (the journal file), a database URL as written, or the value
    of the environment variable named by ``env:<VARIABLE>`` (so a password never sits in a
    parameter, which kedro-mlflow would log)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SearchSpaceError(f"{key}: expected null, a database URL or env:<VARIABLE>, got {value!r}")
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):].strip()
        url = os.environ.get(name, "").strip()
        if not url:
            raise SearchSpaceError(f"{key} is {value!r}, but the environment variable {name} is not set: export "
                                   f"{name}=postgresql+psycopg://<user>@<host>:<port>/<database> (docs/team.md)")
        value = url
    if "://" not in value:
        raise SearchSpaceError(f"{key}: expected a database URL (postgresql+psycopg://...), got {value!r}; "
                               f"null keeps the journal file in tuning.storage_dir")
    return value


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _positive_int(value: Any, key: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SearchSpaceError(f"{key}: expected an integer >= {minimum}{' or null' if allow_none else ''}, "
                               f"got {value!r}")
    return value


def _storage_setting(value: Any, key: str) -> str | None:
    """Check ``tuning.storage``'s form now (an ``env:`` variable is read when the study opens)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not (value.startswith(ENV_PREFIX) or "://" in value):
        raise SearchSpaceError(f"{key}: expected null, a database URL (postgresql+psycopg://...) or "
                               f"env:<VARIABLE>, got {value!r}")
    return value


def _section(config: Mapping[str, Any], name: str, known: set[str], key: str) -> dict[str, Any]:
    section = config.get(name) or {}
    if not isinstance(section, Mapping):
        raise SearchSpaceError(f"{key}.{name}: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - known)
    if unknown:
        raise SearchSpaceError(f"{key}.{name}: unknown key(s) {unknown} (known: {sorted(known)})")
    return dict(section)


@dataclass(frozen=True)
class TuningConfig:
    """What one architecture's study runs: trials, workers, storage, sampler, pruner, search space."""

    architecture: str
    search_space: SearchSpace
    n_trials: int = 8                        # COMPLETE + PRUNED trials the study reaches
    n_workers: int = 1                       # worker processes
    threads_per_worker: int | None = None    # None = available cores // n_workers
    pin_cores: bool = False                  # several workers: each on its own cores (Linux affinity)
    storage_dir: str = "data/06_models/tuning"
    storage: str | None = None               # None = journal file; a database URL or env:<VARIABLE>
    seed: int = 42
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval_s: int = 10
    grace_period_s: int = 60
    max_retry: int | None = 2
    trial: dict[str, Any] = field(default_factory=dict)   # training overrides for every trial
    importance_evaluator: str = "fanova"     # parameter importances after the study: fanova | ped_anova

    @classmethod
    def from_params(cls, tuning: Mapping[str, Any], architecture: str, key: str = "tuning") -> TuningConfig:
        """The shared ``tuning`` parameters with ``tuning.architectures.<architecture>`` merged over them."""
        if not isinstance(tuning, Mapping):
            raise SearchSpaceError(f"{key}: expected a mapping, got {tuning!r}")
        unknown = sorted(set(tuning) - KNOWN_KEYS)
        if unknown:
            raise SearchSpaceError(f"{key}: unknown key(s) {unknown} (known: {sorted(KNOWN_KEYS)})")
        per_architecture = tuning.get("architectures") or {}
        if not isinstance(per_architecture, Mapping):
            raise SearchSpaceError(f"{key}.architectures: expected a mapping of architecture names")
        override = per_architecture.get(architecture) or {}
        bad = sorted(set(override) - (KNOWN_KEYS - {"architectures"}))
        if bad:
            raise SearchSpaceError(f"{key}.architectures.{architecture}: unknown key(s) {bad}")
        merged = merge_settings({k: v for k, v in tuning.items() if k != "architectures"}, override)
        where = f"{key}.architectures.{architecture}" if override else key
        n_workers = _positive_int(merged.get("n_workers", 1), f"{where}.n_workers")
        heartbeat = _positive_int(merged.get("heartbeat_interval_s", 10), f"{where}.heartbeat_interval_s")
        grace = _positive_int(merged.get("grace_period_s", 60), f"{where}.grace_period_s")
        if grace <= heartbeat:
            raise SearchSpaceError(f"{where}.grace_period_s ({grace}) must be larger than "
                                   f"heartbeat_interval_s ({heartbeat})")
        pin_cores = merged.get("pin_cores", False)
        if not isinstance(pin_cores, bool):
            raise SearchSpaceError(f"{where}.pin_cores: expected true or false, got {pin_cores!r}")
        trial = merged.get("trial") or {}
        if not isinstance(trial, Mapping):
            raise SearchSpaceError(f"{where}.trial: expected a mapping of training settings, got {trial!r}")
        importance_evaluator = merged.get("importance_evaluator", "fanova")
        if importance_evaluator not in IMPORTANCE_EVALUATORS:
            raise SearchSpaceError(f"{where}.importance_evaluator: expected one of {list(IMPORTANCE_EVALUATORS)}, "
                                   f"got {importance_evaluator!r}")
        search_space_key = f"{key}.search_space" if "search_space" not in override else f"{where}.search_space"
        return cls(
            architecture=architecture,
            search_space=SearchSpace.from_config(merged.get("search_space"), search_space_key),
            n_trials=_positive_int(merged.get("n_trials", 8), f"{where}.n_trials"),
            n_workers=n_workers,
            threads_per_worker=_positive_int(merged.get("threads_per_worker"), f"{where}.threads_per_worker",
                                             allow_none=True),
            pin_cores=pin_cores,
            storage_dir=str(merged.get("storage_dir") or "data/06_models/tuning"),
            storage=_storage_setting(merged.get("storage"), f"{where}.storage"),
            seed=_positive_int(merged.get("seed", 42), f"{where}.seed", minimum=0),
            sampler=_section(merged, "sampler", SAMPLER_KEYS, where),
            pruner=_section(merged, "pruner", PRUNER_KEYS, where),
            heartbeat_interval_s=heartbeat, grace_period_s=grace,
            max_retry=_positive_int(merged.get("max_retry", 2), f"{where}.max_retry", minimum=0, allow_none=True),
            trial=dict(trial), importance_evaluator=importance_evaluator,
        )

    @property
    def storage_path(self) -> Path:
        """The study's journal file: ``<storage_dir>/<architecture>.optuna.log``."""
        return Path(self.storage_dir) / f"{self.architecture}.optuna.log"

    def storage_location(self) -> str:
        """Where the study lives: the database URL of ``tuning.storage`` (``env:`` resolved now), else
        the absolute path of :attr:`storage_path`."""
        return resolve_storage(self.storage) or str(self.storage_path.resolve())

    def threads(self, cores: int | None = None) -> int:
        """Threads per worker: the configured number, else ``cores // n_workers`` (at least 1)."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, (cores or available_cores()) // self.n_workers)

    def worker_cores(self, n_workers: int | None = None, threads: int | None = None,
                     available: list[int] | None = None) -> list[tuple[int, ...] | None]:
        """The cores each of ``n_workers`` workers is pinned to: disjoint sets of ``threads`` cores
        when ``pin_cores`` is on, there are several workers and enough cores; else None (unpinned)."""
        n_workers = n_workers or self.n_workers
        threads = threads or self.threads()
        if available is None:
            try:
                available = sorted(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - not Linux
                return [None] * n_workers
        if not self.pin_cores or n_workers < 2 or n_workers * threads > len(available):
            return [None] * n_workers
        return [tuple(available[i * threads:(i + 1) * threads]) for i in range(n_workers)]

    def trial_settings(self, training: Mapping[str, Any], architecture: Mapping[str, Any]) -> dict[str, Any]:
        """The architecture's training settings with ``trial`` merged over them (before sampling)."""
        from pancreas_seg.learning.setup import architecture_settings  # noqa: PLC0415

        return merge_settings(architecture_settings(training, architecture), self.trial)
