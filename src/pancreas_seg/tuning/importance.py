"""What mattered in a finished study: parameter importances, the best configuration and two figures.

No Kedro, no MLflow and no pyplot state left behind (Optuna's matplotlib plots are made inside an
``rc_context`` and their figures are detached from pyplot before they are returned).

* :func:`study_importances`: Optuna's parameter importances (``optuna.importance``, fANOVA or
  PED-ANOVA, the evaluator named in the result) over the study's COMPLETE trials, and the best
  configuration. When they cannot mean anything (fewer than 2 complete trials, no parameter that
  varies, every complete trial with the same value) nothing is computed and ``status`` /
  ``reason`` say why; with one varied parameter its importance is 1 by construction, and the
  status says so.
* :func:`plot_param_importances` and :func:`plot_parallel_coordinate`: Optuna's own matplotlib plots
  (``optuna.visualization.matplotlib``), or a figure that states why there is nothing to plot.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure

from pancreas_seg.tuning.search_space import SearchSpace

#: Evaluator names accepted in ``tuning.importance_evaluator`` -> the Optuna class used.
EVALUATORS = {"fanova": "FanovaImportanceEvaluator", "ped_anova": "PedAnovaImportanceEvaluator"}
#: ``status`` of :func:`study_importances`.
COMPUTED, SINGLE_PARAMETER, NOT_COMPUTED = "computed", "single_parameter", "not_computed"
MIN_COMPLETE_TRIALS = 2
#: Below this many complete trials the result carries a note that the ranking is rough.
FEW_COMPLETE_TRIALS = 10


def make_evaluator(name: str, seed: int | None = None) -> Any:
    """The Optuna importance evaluator called ``name`` (``fanova``: its random forest seeded with ``seed``)."""
    import optuna  # noqa: PLC0415

    if name == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=seed)
    if name == "ped_anova":
        return optuna.importance.PedAnovaImportanceEvaluator()
    raise ValueError(f"unknown importance evaluator {name!r} (known: {', '.join(EVALUATORS)})")


def _complete_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState  # noqa: PLC0415

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]


def _best(study: Any, complete: list[Any], search_space: SearchSpace | None) -> dict[str, Any] | None:
    if not complete:
        return None
    maximise = study.direction.name == "MAXIMIZE"
    best = (max if maximise else min)(complete, key=lambda t: t.value)
    summary: dict[str, Any] = {"number": best.number, "value": float(best.value), "params": dict(best.params)}
    if search_space is not None and set(best.params) == set(search_space.names):
        summary["overrides"] = search_space.to_overrides(best.params)
    return summary


def study_importances(study: Any, evaluator: str = "fanova", *, seed: int | None = 0,
                      objective: str = "objective value",
                      search_space: SearchSpace | None = None) -> dict[str, Any]:
    """Parameter importances and the best configuration of ``study`` (an ``optuna.Study``).

    Returns a JSON-able mapping: ``evaluator`` (``fanova`` / ``ped_anova``) and ``evaluator_class``,
    ``objective`` (what the trial values are), ``status`` (``computed``, ``single_parameter`` or
    ``not_computed``), ``reason`` (why not, or None), ``n_complete_trials``, ``n_trials``,
    ``varied_params`` (parameters that took at least 2 values over the complete trials) and
    ``constant_params`` (the others), ``importances`` (parameter -> importance, normalised to sum
    to 1, largest first; empty when not computed), ``notes`` (warnings Optuna raised while
    computing, and one below :data:`FEW_COMPLETE_TRIALS` complete trials) and ``best``
    (``number``, ``value``, ``params`` and, with ``search_space``, ``overrides``; None without a
    complete trial).
    """
    import optuna  # noqa: PLC0415
    from optuna.search_space import intersection_search_space  # noqa: PLC0415

    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown importance evaluator {evaluator!r} (known: {', '.join(EVALUATORS)})")
    complete = _complete_trials(study)
    distributions = intersection_search_space(complete) if complete else {}
    varied = sorted(name for name, dist in distributions.items()
                    if not dist.single() and len({repr(t.params[name]) for t in complete}) > 1)
    result: dict[str, Any] = {
        "study_name": study.study_name, "direction": study.direction.name.lower(), "objective": objective,
        "evaluator": evaluator, "evaluator_class": EVALUATORS[evaluator],
        "status": NOT_COMPUTED, "reason": None,
        "n_complete_trials": len(complete), "n_trials": len(study.get_trials(deepcopy=False)),
        "varied_params": varied, "constant_params": sorted(set(distributions) - set(varied)),
        "importances": {}, "notes": [], "best": _best(study, complete, search_space),
    }
    if len(complete) < MIN_COMPLETE_TRIALS:
        result["reason"] = (f"{len(complete)} complete trial(s): importances need at least "
                            f"{MIN_COMPLETE_TRIALS} (pruned and failed trials do not count)")
        return result
    if not varied:
        result["reason"] = "no parameter varies over the complete trials: nothing to rank"
        return result
    if len({float(t.value) for t in complete}) == 1:
        result["reason"] = f"all {len(complete)} complete trials have the same value: nothing to explain"
        return result
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importances = optuna.importance.get_param_importances(
            study, evaluator=make_evaluator(evaluator, seed), params=sorted(distributions))
    result["notes"] = sorted({str(w.message) for w in caught})
    if len(complete) < FEW_COMPLETE_TRIALS:
        result["notes"].append(f"only {len(complete)} complete trials for {len(varied)} varied parameter(s): "
                               "the ranking is rough")
    result["importances"] = {name: float(value) for name, value in
                             sorted(importances.items(), key=lambda item: (-item[1], item[0]))}
    if len(varied) == 1:
        result["status"] = SINGLE_PARAMETER
        result["reason"] = (f"only {varied[0]} varies over the complete trials: its importance is 1 by "
                            "construction and says nothing about other parameters")
    else:
        result["status"] = COMPUTED
    return result


def _message_figure(title: str, message: str) -> Figure:
    """A figure that says why there is no plot (no pyplot)."""
    figure = Figure(figsize=(6.4, 3.2))
    axes = figure.subplots()
    axes.set_axis_off()
    axes.set_title(title, loc="left")
    axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=axes.transAxes)
    return figure


def _optuna_plot(draw: Callable[[], Any], size: tuple[float, float]) -> Figure:
    """Run one of Optuna's matplotlib plots without leaving pyplot state behind.

    Optuna's plots call ``plt.style.use("ggplot")`` and ``plt.subplots()``: the style is undone by
    ``rc_context`` and the figure closed in pyplot (it still draws and saves). The matplotlib
    backend of these plots is experimental in Optuna (``ExperimentalWarning``): that warning, and
    matplotlib's one for an axis whose trials all took the same value, are not shown.
    """
    import matplotlib  # noqa: PLC0415
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from optuna.exceptions import ExperimentalWarning  # noqa: PLC0415

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high ylims",
                                category=UserWarning)
        axes = draw()
        figure = axes.figure
        figure.set_size_inches(*size)
        figure.tight_layout()
    plt.close(figure)
    return figure


def plot_param_importances(study: Any, result: dict[str, Any], *, seed: int | None = 0,
                           title: str | None = None) -> Figure:
    """Optuna's importance bar plot (``plot_param_importances``) with the evaluator of ``result``
    (from :func:`study_importances`, same ``seed``: the same numbers), or a figure saying why not."""
    title = title or f"{result['study_name']}: parameter importances ({result['evaluator']})"
    if result["status"] == NOT_COMPUTED:
        return _message_figure(title, f"not computed: {result['reason']}")
    from optuna.visualization.matplotlib import plot_param_importances as optuna_plot  # noqa: PLC0415

    params = sorted(set(result["varied_params"]) | set(result["constant_params"]))
    figure = _optuna_plot(lambda: optuna_plot(study, evaluator=make_evaluator(result["evaluator"], seed),
                                              params=params, target_name=result["objective"]),
                          (7.0, 1.2 + 0.45 * len(params)))
    axes = figure.axes[0]
    axes.set_title(f"{title}\n{result['n_complete_trials']} complete trials"
                   + (" - one varied parameter: 1 by construction" if result["status"] == SINGLE_PARAMETER
                      else ""), loc="left", fontsize=10)
    axes.set_xlabel(f"importance for {result['objective']} ({result['evaluator_class']}, sum = 1)")
    return figure


def plot_parallel_coordinate(study: Any, result: dict[str, Any], title: str | None = None) -> Figure:
    """Optuna's parallel-coordinate plot of the COMPLETE trials (``plot_parallel_coordinate``; the
    first axis is the trial value ``result['objective']``), or a figure saying why not."""
    title = title or f"{result['study_name']}: parallel coordinates"
    params = sorted(set(result["varied_params"]) | set(result["constant_params"]))
    if result["n_complete_trials"] < MIN_COMPLETE_TRIALS or not params:
        return _message_figure(title, f"not drawn: {result['n_complete_trials']} complete trial(s) with "
                                      f"{len(params)} parameter(s); it needs {MIN_COMPLETE_TRIALS} and 1")
    from optuna.visualization.matplotlib import plot_parallel_coordinate as optuna_plot  # noqa: PLC0415

    figure = _optuna_plot(lambda: optuna_plot(study, params=params, target_name=result["objective"]),
                          (max(7.0, 1.8 * (len(params) + 1)), 4.8))
    figure.axes[0].set_title(f"{title} ({result['n_complete_trials']} complete trials)", y=1.03, fontsize=10)
    return figure
