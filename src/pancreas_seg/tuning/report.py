"""What a study found: the trials table, the best trial, and a figure (no Kedro, no pyplot state).

* :func:`trials_table`: one row per trial: number, state, value, duration, one ``params_<name>``
  column per parameter, epochs run, the epoch a pruned trial stopped at, the trial it retries and
  its MLflow run.
* :func:`best_trial_summary`: the best COMPLETE trial's value and parameters (flat, and nested as
  training overrides ready to paste under ``<architecture>.architecture.overrides``).
* :func:`plot_study`: optimisation history, the per-epoch validation Dice each trial reported (the
  pruner's view) and a parallel-coordinate plot of the parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pancreas_seg.tuning.search_space import SearchSpace

STATE_COLOURS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red", "RUNNING": "tab:gray",
                 "WAITING": "tab:gray"}


def trials_table(study: Any) -> pd.DataFrame:
    """One row per trial of ``study`` (an ``optuna.Study``), by trial number."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else math.nan
        rows.append({
            "number": trial.number, "state": trial.state.name,
            "value": trial.value if trial.value is not None else math.nan,
            "duration_s": round(duration, 2) if math.isfinite(duration) else math.nan,
            **{f"params_{name}": value for name, value in trial.params.items()},
            "epochs_completed": trial.user_attrs.get("epochs_completed"),
            "pruned_at_epoch": trial.user_attrs.get("pruned_at_epoch"),
            "retried_from_trial": trial.system_attrs.get("failed_trial"),
            "error": trial.user_attrs.get("error"),
            "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
            "datetime_start": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None,
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["number", "state", "value", "duration_s"])
    for column in ("epochs_completed", "pruned_at_epoch", "retried_from_trial"):
        table[column] = table[column].astype("Int64")   # integers with gaps, not floats
    param_columns = sorted(c for c in table.columns if c.startswith("params_"))
    first = ["number", "state", "value", "duration_s"]
    rest = [c for c in table.columns if c not in first and c not in param_columns]
    return table[first + param_columns + rest].sort_values("number").reset_index(drop=True)


def best_trial_summary(study: Any, search_space: SearchSpace, monitor: str, n_trials: int,
                       **extra: Any) -> dict[str, Any]:
    """The best COMPLETE trial (``best: null`` when there is none) and the study's counts."""
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    best = max(complete, key=lambda t: t.value) if complete else None
    summary: dict[str, Any] = {
        "study_name": study.study_name, "direction": "maximize", "objective": f"best {monitor} over a trial's epochs",
        "n_trials_target": n_trials, "trial_states": states,
        "search_space": search_space.describe(),
        "best": None,
        **extra,
    }
    if best is not None:
        summary["best"] = {
            "number": best.number, "value": float(best.value), "params": dict(best.params),
            "overrides": search_space.to_overrides(best.params),
            "duration_s": (best.datetime_complete - best.datetime_start).total_seconds()
            if best.datetime_complete and best.datetime_start else None,
            "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        }
    return summary


def _axis_position(parameter: Any, value: Any) -> float:
    """``value`` on ``parameter``'s axis scaled to [0, 1] (log scale for log parameters)."""
    if parameter.kind == "categorical":
        index = next((i for i, c in enumerate(parameter.choices) if c == value), 0)
        return index / max(1, len(parameter.choices) - 1)
    low, high, x = float(parameter.low), float(parameter.high), float(value)
    if parameter.log:
        low, high, x = math.log10(low), math.log10(high), math.log10(x)
    return (x - low) / (high - low)


def plot_study(study: Any, search_space: SearchSpace, monitor: str, title: str) -> Figure:
    """Three panels: history (value per trial, best so far), per-epoch reports, parallel coordinates."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    figure = Figure(figsize=(15, 4.6))
    history, curves, parallel = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.5]})

    # 1. optimisation history: COMPLETE values; PRUNED trials at their last reported value
    best_so_far, best = [], -math.inf
    for trial in trials:
        state = trial.state.name
        if state == "COMPLETE" and trial.value is not None:
            history.scatter(trial.number, trial.value, color=STATE_COLOURS[state], zorder=3)
            best = max(best, trial.value)
        elif state == "PRUNED" and trial.intermediate_values:
            last = trial.intermediate_values[max(trial.intermediate_values)]
            history.scatter(trial.number, last, facecolors="none", edgecolors=STATE_COLOURS[state], zorder=3)
        elif state == "FAIL":
            history.axvline(trial.number, color=STATE_COLOURS[state], alpha=0.3, lw=1)
        best_so_far.append((trial.number, best if math.isfinite(best) else math.nan))
    if best_so_far:
        history.step(*zip(*best_so_far, strict=True), where="post", color="black", lw=1, label="best so far")
    history.set(title="optimisation history", xlabel="trial", ylabel=monitor)
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    history.legend(handles=[
        Line2D([], [], marker="o", ls="", color=STATE_COLOURS["COMPLETE"], label="complete"),
        Line2D([], [], marker="o", ls="", markerfacecolor="none", color=STATE_COLOURS["PRUNED"], label="pruned (last epoch)"),
        Line2D([], [], color=STATE_COLOURS["FAIL"], alpha=0.5, label="failed"),
        Line2D([], [], color="black", lw=1, label="best so far")], fontsize=7, loc="lower right")

    # 2. what the pruner saw: the monitored value after each epoch
    for trial in trials:
        if trial.intermediate_values:
            steps = sorted(trial.intermediate_values)
            curves.plot([s + 1 for s in steps], [trial.intermediate_values[s] for s in steps], marker=".",
                        color=STATE_COLOURS.get(trial.state.name, "gray"), alpha=0.8)
    curves.set(title="per-epoch reports (pruning)", xlabel="epoch", ylabel=monitor)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))

    # 3. parallel coordinates of the COMPLETE trials, coloured by value
    parameters = list(search_space)
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None
                and all(p.name in t.params for p in parameters)]
    x = np.arange(len(parameters) + 1)
    if complete:
        values = np.array([t.value for t in complete])
        low, high = float(values.min()), float(values.max())
        cmap = colormaps["viridis"]
        for trial in sorted(complete, key=lambda t: t.value):
            shade = 0.5 if high == low else (trial.value - low) / (high - low)
            ys = [_axis_position(p, trial.params[p.name]) for p in parameters]
            ys.append(shade)
            parallel.plot(x, ys, color=cmap(shade), alpha=0.9, lw=1.5)
        for i, parameter in enumerate(parameters):
            if parameter.kind == "categorical":
                for j, choice in enumerate(parameter.choices):
                    parallel.text(i, j / max(1, len(parameter.choices) - 1), f" {choice}", fontsize=7, va="center")
            else:
                parallel.text(i, 0, f" {parameter.low:g}", fontsize=7, va="bottom")
                parallel.text(i, 1, f" {parameter.high:g}", fontsize=7, va="top")
        parallel.text(len(parameters), 0, f" {low:.3f}", fontsize=7, va="bottom")
        parallel.text(len(parameters), 1, f" {high:.3f}", fontsize=7, va="top")
    else:
        parallel.text(0.5, 0.5, "no complete trial yet", ha="center", transform=parallel.transAxes)
    for i in x:
        parallel.axvline(i, color="lightgray", lw=1, zorder=0)
    parallel.set_xticks(x, [*(p.name for p in parameters), monitor], rotation=20, fontsize=8)
    parallel.set_yticks([])
    parallel.set(title="parameters of complete trials (colour: value)", ylim=(-0.05, 1.05))
    figure.suptitle(title)
    figure.tight_layout()
    return figure

