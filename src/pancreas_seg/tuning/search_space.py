"""The search space of a study, read from configuration (``tuning.search_space``), and sampled.

A search space mirrors the training settings it overrides: a nested mapping whose leaves are
parameter specifications (mappings with a ``type``)::

    learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    batch_size: {type: categorical, choices: [4, 8, 16]}
    model:
      dropout: {type: float, low: 0.0, high: 0.3}

A trial's values are named by their dotted path (``model.dropout``) in Optuna, MLflow and the
reports, and :meth:`SearchSpace.to_overrides` nests them again, ready to be deep-merged over the
architecture's training settings. Every error names the configuration key it is about.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("float", "int", "categorical")
_ALLOWED_KEYS = {"float": {"type", "low", "high", "log", "step"},
                 "int": {"type", "low", "high", "log", "step"},
                 "categorical": {"type", "choices"}}


class SearchSpaceError(ValueError):
    """A search-space specification that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Parameter:
    """One hyperparameter: its dotted ``name`` and its distribution."""

    name: str
    kind: str                               # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False                       # sample log-uniformly (low > 0)
    step: float | int | None = None         # discretisation (not with log)
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value ``trial`` (an ``optuna.Trial``) samples for this parameter."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value: Any) -> bool:
        """True when ``value`` is one this parameter can take."""
        if self.kind == "categorical":
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and value != int(value):
            return False
        tolerance = 1e-12 * max(1.0, abs(float(self.high)))
        return float(self.low) - tolerance <= float(value) <= float(self.high) + tolerance

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name}: one of {list(self.choices)}"
        scale = "log-uniform" if self.log else "uniform"
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.name}: {self.kind} {scale} in [{self.low}, {self.high}]{step}"


class SearchSpace:
    """The parameters of a study, in configuration order."""

    def __init__(self, parameters: tuple[Parameter, ...]) -> None:
        if not parameters:
            raise SearchSpaceError("the search space is empty: give at least one parameter")
        self.parameters = parameters

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, key: str = "tuning.search_space") -> SearchSpace:
        """Parse the nested specification ``config``; errors name ``key`` plus the dotted path."""
        if not isinstance(config, Mapping):
            raise SearchSpaceError(f"{key}: expected a mapping of parameters, got {type(config).__name__}")
        return cls(tuple(_parse(config, key, ())))

    def __iter__(self) -> Iterator[Parameter]:
        return iter(self.parameters)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """``{dotted name: value}`` sampled by ``trial`` (fixed values of an enqueued/retried trial)."""
        return {p.name: p.suggest(trial) for p in self.parameters}

    def contains(self, values: Mapping[str, Any]) -> bool:
        """True when ``values`` has exactly this space's names, each inside its range or choices."""
        by_name = {p.name: p for p in self.parameters}
        return set(values) == set(by_name) and all(by_name[n].contains(v) for n, v in values.items())

    def to_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``{"model.dropout": 0.1}`` -> ``{"model": {"dropout": 0.1}}`` (to deep-merge over settings)."""
        nested: dict[str, Any] = {}
        for name, value in values.items():
            *parents, leaf = name.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return nested

    def check_settings(self, settings: Mapping[str, Any], what: str, key: str = "tuning.search_space") -> None:
        """Fail when a parameter is not a key of ``settings`` (a typo would tune nothing)."""
        for parameter in self.parameters:
            node: Any = settings
            path = parameter.name.split(".")
            for depth, part in enumerate(path):
                if not isinstance(node, Mapping) or part not in node:
                    parent = ".".join(path[:depth])
                    known = sorted(node) if isinstance(node, Mapping) else []
                    raise SearchSpaceError(
                        f"{key}.{parameter.name}: {what} has no setting "
                        f"{'.'.join(path[:depth + 1])!r}" + (f" (known under {parent or 'the top level'}: "
                                                              f"{', '.join(map(str, known))})" if known else ""))
                node = node[part]

    def describe(self) -> list[str]:
        return [p.describe() for p in self.parameters]


def _parse(config: Mapping[str, Any], key: str, path: tuple[str, ...]) -> Iterator[Parameter]:
    for name, spec in config.items():
        if not isinstance(name, str) or not name or "." in name:
            raise SearchSpaceError(f"{key}.{'.'.join(path)}: parameter names must be plain words, got {name!r}")
        where = f"{key}.{'.'.join((*path, name))}"
        if not isinstance(spec, Mapping):
            raise SearchSpaceError(f"{where}: expected a mapping with 'type' ({' | '.join(KINDS)}) "
                                   f"or a group of parameters, got {spec!r}")
        if "type" in spec:
            yield _parameter(".".join((*path, name)), dict(spec), where)
        else:
            if not spec:
                raise SearchSpaceError(f"{where}: empty group (give parameters, or remove the key)")
            yield from _parse(spec, key, (*path, name))


def _number(spec: Mapping[str, Any], field: str, where: str, integer: bool) -> float | int:
    value = spec.get(field)
    if value is None:
        raise SearchSpaceError(f"{where}: '{field}' is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchSpaceError(f"{where}: '{field}' must be a finite number, got {value!r}")
    if integer and value != int(value):
        raise SearchSpaceError(f"{where}: '{field}' must be an integer for type int, got {value!r}")
    return int(value) if integer else float(value)


def _parameter(name: str, spec: dict[str, Any], where: str) -> Parameter:
    kind = spec["type"]
    if kind not in KINDS:
        raise SearchSpaceError(f"{where}: unknown type {kind!r} (expected {' | '.join(KINDS)})")
    unknown = sorted(set(spec) - _ALLOWED_KEYS[kind])
    if unknown:
        raise SearchSpaceError(f"{where}: unknown key(s) {unknown} for type {kind} "
                               f"(allowed: {sorted(_ALLOWED_KEYS[kind])})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise SearchSpaceError(f"{where}: 'choices' must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise SearchSpaceError(f"{where}: choices must be null, booleans, numbers or strings, got {bad!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise SearchSpaceError(f"{where}: 'choices' has duplicates: {list(choices)!r}")
        return Parameter(name, kind, choices=tuple(choices))
    integer = kind == "int"
    low, high = _number(spec, "low", where, integer), _number(spec, "high", where, integer)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SearchSpaceError(f"{where}: 'log' must be true or false, got {log!r}")
    if not low < high:
        raise SearchSpaceError(f"{where}: 'low' ({low}) must be smaller than 'high' ({high})")
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: a log-uniform range needs 'low' > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if log:
            raise SearchSpaceError(f"{where}: 'step' cannot be combined with 'log: true'")
        step = _number(spec, "step", where, integer)
        if step <= 0:
            raise SearchSpaceError(f"{where}: 'step' must be > 0, got {step}")
    return Parameter(name, kind, low=low, high=high, log=log, step=step)
