"""Parameter importances of a finished study (``pancreas_seg.tuning.importance``), their MLflow logging
(``tuning.mlflow_runs.log_importances``) and the pipeline's ``importances`` node, on real Optuna
studies with a synthetic objective in which ``learning_rate`` dominates and ``model.dropout`` barely
matters, and on studies too small to rank anything. MLflow is a real sqlite store under tmp_path."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import optuna
import pytest
from kedro.config import OmegaConfigLoader
from matplotlib.figure import Figure

from pancreas_seg.settings import CONFIG_LOADER_ARGS
from pancreas_seg.tuning import mlflow_runs
from pancreas_seg.tuning.config import IMPORTANCE_EVALUATORS, TuningConfig
from pancreas_seg.tuning.importance import (
    COMPUTED,
    EVALUATORS,
    NOT_COMPUTED,
    SINGLE_PARAMETER,
    plot_parallel_coordinate,
    plot_param_importances,
    study_importances,
)
from pancreas_seg.tuning.search_space import SearchSpace, SearchSpaceError

CONF = Path(__file__).resolve().parents[2] / "conf"
SPACE = SearchSpace.from_config({
    "learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
    "batch_size": {"type": "categorical", "choices": [4, 8, 16]},
    "model": {"dropout": {"type": "float", "low": 0.0, "high": 0.4}},
})


def dominated_by_learning_rate(values: dict) -> float:
    """A Dice-like value: a peak at learning_rate 3e-3 (log scale), a tiny dropout effect, no batch effect."""
    return 0.8 - 0.2 * (math.log10(values["learning_rate"]) + 2.5) ** 2 - 0.01 * values["model.dropout"]


def make_study(n_trials: int = 30, storage: object = None, name: str = "unet", seed: int = 0) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    study.optimize(lambda trial: dominated_by_learning_rate(SPACE.suggest(trial)), n_trials=n_trials)
    return study


@pytest.fixture(autouse=True)
def quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    return make_study()


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory: pytest.TempPathFactory):
    """One real sqlite store for the module (creating one takes seconds); each test makes its own experiment."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    try:
        yield mlflow.MlflowClient()
    finally:
        mlflow.set_tracking_uri(previous)


def _new_run(client: mlflow.MlflowClient, request: pytest.FixtureRequest) -> str:
    experiment = client.create_experiment(request.node.name)
    return client.create_run(experiment, run_name="unet study").info.run_id


def test_the_config_and_the_module_know_the_same_evaluators() -> None:
    assert set(IMPORTANCE_EVALUATORS) == set(EVALUATORS)
    tuning = {"search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}}
    assert TuningConfig.from_params(tuning, "unet").importance_evaluator == "fanova"
    assert TuningConfig.from_params({**tuning, "importance_evaluator": "ped_anova"}, "unet").importance_evaluator \
        == "ped_anova"
    with pytest.raises(SearchSpaceError, match="tuning.importance_evaluator"):
        TuningConfig.from_params({**tuning, "importance_evaluator": "shap"}, "unet")


@pytest.mark.parametrize("evaluator", sorted(EVALUATORS))
def test_the_dominant_parameter_has_the_largest_importance(study: optuna.Study, evaluator: str) -> None:
    result = study_importances(study, evaluator, seed=1, objective="val_dice_pancreas", search_space=SPACE)

    assert result["status"] == COMPUTED and result["reason"] is None
    assert result["evaluator"] == evaluator and result["evaluator_class"] == EVALUATORS[evaluator]
    importances = result["importances"]
    assert set(importances) == {"learning_rate", "batch_size", "model.dropout"}
    assert max(importances, key=importances.get) == "learning_rate"
    assert list(importances)[0] == "learning_rate"                      # largest first
    assert importances["learning_rate"] > 0.5 > importances["model.dropout"]
    assert sum(importances.values()) == pytest.approx(1.0)
    assert result["n_complete_trials"] == 30 and result["varied_params"] == sorted(importances)
    assert not [note for note in result["notes"] if "rough" in note]    # 30 trials: no few-trials note
    json.dumps(result)                                                   # JSON-able as it is

    best = study.best_trial
    assert result["best"]["number"] == best.number and result["best"]["params"] == best.params
    assert result["best"]["value"] == pytest.approx(best.value)
    assert result["best"]["overrides"] == {"learning_rate": best.params["learning_rate"],
                                           "batch_size": best.params["batch_size"],
                                           "model": {"dropout": best.params["model.dropout"]}}


def test_plots_are_optunas_with_the_computed_numbers_and_leave_pyplot_alone(study: optuna.Study) -> None:
    result = study_importances(study, "fanova", seed=3, objective="val_dice_pancreas")
    figures_before, rc_before = plt.get_fignums(), dict(matplotlib.rcParams)

    importance_figure = plot_param_importances(study, result, seed=3)
    parallel_figure = plot_parallel_coordinate(study, result)

    assert isinstance(importance_figure, Figure) and isinstance(parallel_figure, Figure)
    bars = importance_figure.axes[0]
    assert "Hyperparameter" in bars.get_ylabel() and "val_dice_pancreas" in bars.get_xlabel()
    assert "fanova" in bars.get_title(loc="left") and "30 complete trials" in bars.get_title(loc="left")
    labels = [tick.get_text() for tick in bars.get_yticklabels()]
    widths = dict(zip(labels, (patch.get_width() for patch in bars.patches), strict=True))
    assert widths == pytest.approx(result["importances"])               # the same evaluator, the same seed
    assert labels[-1] == "learning_rate"                                 # the top bar

    lines = parallel_figure.axes[0]
    assert [tick.get_text() for tick in lines.get_xticklabels()] == [
        "val_dice_pancreas", "batch_size", "learning_rate", "model.dropout"]
    assert "parallel coordinates" in lines.get_title() and "30 complete trials" in lines.get_title()
    assert len(lines.collections[0].get_segments()) == 30                # one line per complete trial

    for figure in (importance_figure, parallel_figure):
        figure.canvas.draw()                                             # draws after pyplot closed it
    assert plt.get_fignums() == figures_before
    assert {k: v for k, v in matplotlib.rcParams.items() if rc_before.get(k) != v} == {}   # no ggplot left


def _failing(trial: optuna.Trial) -> float:
    SPACE.suggest(trial)
    raise RuntimeError("diverged")


def test_too_few_complete_trials_give_a_reason_not_an_error() -> None:
    study = make_study(n_trials=1)
    study.optimize(_failing, n_trials=1, catch=(RuntimeError,))
    pruned = study.ask()
    SPACE.suggest(pruned)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)

    result = study_importances(study, "fanova", objective="val_dice_pancreas")

    assert result["status"] == NOT_COMPUTED and result["importances"] == {}
    assert "1 complete trial(s)" in result["reason"] and "at least 2" in result["reason"]
    assert result["n_complete_trials"] == 1 and result["n_trials"] == 3
    assert result["best"]["number"] == 0                                 # the best configuration is still there
    for figure in (plot_param_importances(study, result), plot_parallel_coordinate(study, result)):
        texts = " ".join(text.get_text() for axes in figure.axes for text in axes.texts)
        assert "not computed" in texts or "not drawn" in texts

    empty = optuna.create_study(direction="maximize")
    nothing = study_importances(empty, "ped_anova")
    assert nothing["status"] == NOT_COMPUTED and nothing["best"] is None and "0 complete" in nothing["reason"]


def test_no_varied_parameter_one_varied_parameter_and_a_constant_value() -> None:
    fixed = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    fixed.optimize(lambda t: 0.1 * t.suggest_categorical("batch_size", [8]) + t.number, n_trials=4)
    result = study_importances(fixed, "fanova")
    assert result["status"] == NOT_COMPUTED and "no parameter varies" in result["reason"]
    assert result["constant_params"] == ["batch_size"] and result["varied_params"] == []

    one = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    one.optimize(lambda t: t.suggest_float("learning_rate", 0, 1) + t.suggest_categorical("batch_size", [8]),
                 n_trials=6)
    result = study_importances(one, "fanova")
    assert result["status"] == SINGLE_PARAMETER and "only learning_rate varies" in result["reason"]
    assert result["importances"] == {"learning_rate": pytest.approx(1.0), "batch_size": 0.0}
    assert "1 by construction" in plot_param_importances(one, result).axes[0].get_title(loc="left")

    same_batch = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        same_batch.enqueue_trial({"batch_size": 8})                      # two choices, one value taken
    same_batch.optimize(lambda t: t.suggest_float("learning_rate", 0, 1) + t.suggest_categorical("batch_size", [4, 8]),
                        n_trials=4)
    result = study_importances(same_batch, "fanova")
    assert result["status"] == SINGLE_PARAMETER
    assert result["varied_params"] == ["learning_rate"] and result["constant_params"] == ["batch_size"]
    assert "only 4 complete trials for 1 varied parameter(s): the ranking is rough" in result["notes"]

    flat = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    flat.optimize(lambda t: 0.0 * t.suggest_float("a", 0, 1) + 0.0 * t.suggest_float("b", 0, 1), n_trials=5)
    result = study_importances(flat, "fanova")   # fANOVA itself raises on a constant value
    assert result["status"] == NOT_COMPUTED and "same value" in result["reason"]


def test_importances_are_logged_to_the_study_run(study: optuna.Study, tracking_store: mlflow.MlflowClient,
                                                request: pytest.FixtureRequest) -> None:
    result = study_importances(study, "fanova", objective="val_dice_pancreas")
    run_id = _new_run(tracking_store, request)

    mlflow_runs.log_importances(run_id, result, plot_param_importances(study, result),
                                plot_parallel_coordinate(study, result))

    logged = tracking_store.get_run(run_id).data
    assert {k: v for k, v in logged.metrics.items() if k.startswith("importance.")} == pytest.approx(
        {f"importance.{name}": value for name, value in result["importances"].items()})
    assert logged.tags["importance.evaluator"] == "fanova" and logged.tags["importance.status"] == COMPUTED
    best = study.best_trial
    assert logged.params["best.trial_number"] == str(best.number)
    assert float(logged.params["best.learning_rate"]) == pytest.approx(best.params["learning_rate"])
    assert logged.params["best.batch_size"] == str(best.params["batch_size"])
    artifacts = {a.path for folder in ("tuning", "plots") for a in tracking_store.list_artifacts(run_id, folder)}
    assert {"tuning/importances.json", "plots/param_importances.png", "plots/parallel_coordinate.png"} <= artifacts
    stored = mlflow.artifacts.load_dict(f"runs:/{run_id}/tuning/importances.json")
    assert stored["importances"] == pytest.approx(result["importances"]) and stored["evaluator"] == "fanova"

    # the same node again on the same run (same best) is fine; another evaluator replaces the tags
    mlflow_runs.log_importances(run_id, {**result, "evaluator": "ped_anova"}, Figure(), Figure())
    assert tracking_store.get_run(run_id).data.tags["importance.evaluator"] == "ped_anova"


def test_a_run_holding_other_best_params_keeps_them_with_a_warning(
        study: optuna.Study, tracking_store: mlflow.MlflowClient, caplog: pytest.LogCaptureFixture,
        request: pytest.FixtureRequest) -> None:
    result = study_importances(study, "fanova")
    run_id = _new_run(tracking_store, request)
    tracking_store.log_param(run_id, "best.learning_rate", "0.5")
    with caplog.at_level(logging.WARNING, logger=mlflow_runs.__name__):
        mlflow_runs.log_importances(run_id, result, Figure(), Figure())
    assert "best.* params not logged" in caplog.text
    assert tracking_store.get_run(run_id).data.params["best.learning_rate"] == "0.5"
    assert "importance.learning_rate" in tracking_store.get_run(run_id).data.metrics


def _project_params() -> dict:
    return OmegaConfigLoader(str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": "smoke"})["parameters"]


@pytest.mark.parametrize("n_complete", [12, 1])
def test_the_node_reads_the_journal_and_reports_to_the_study_run(
        tmp_path: Path, tracking_store: mlflow.MlflowClient, caplog: pytest.LogCaptureFixture,
        request: pytest.FixtureRequest, n_complete: int) -> None:
    from pancreas_seg.pipelines.tuning.nodes import report_importances  # noqa: PLC0415

    params = _project_params()
    tuning = {**params["tuning"], "storage_dir": str(tmp_path / "studies")}
    config = TuningConfig.from_params(tuning, "unet")
    config.storage_path.parent.mkdir(parents=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(config.storage_path)))
    study = optuna.create_study(study_name="unet", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=4))
    study.optimize(lambda trial: dominated_by_learning_rate(
        {"model.dropout": 0.0, **config.search_space.suggest(trial)}), n_trials=n_complete)
    run_id = _new_run(tracking_store, request)

    with caplog.at_level(logging.INFO):
        result, importance_figure, parallel_figure = report_importances(
            {"mlflow_study_run_id": run_id}, params["training"], tuning, params["unet"]["architecture"])

    assert result["evaluator"] == config.importance_evaluator and result["objective"] == "val_dice_pancreas"
    assert result["best"]["overrides"] == config.search_space.to_overrides(study.best_trial.params)
    assert isinstance(importance_figure, Figure) and isinstance(parallel_figure, Figure)
    logged = tracking_store.get_run(run_id).data
    assert logged.tags["importance.status"] == result["status"]
    assert logged.params["best.trial_number"] == str(study.best_trial.number)
    node_log = [r for r in caplog.records if r.name == "pancreas_seg.pipelines.tuning.nodes"]
    assert all(r.getMessage().startswith("unet: ") for r in node_log)   # progress names the architecture
    if n_complete >= 2:
        assert result["status"] == COMPUTED
        assert max(result["importances"], key=result["importances"].get) == "learning_rate"
        assert "importance.learning_rate" in logged.metrics
        assert any("importances (fanova, 12 complete trials" in r.getMessage() for r in node_log)
    else:
        assert result["status"] == NOT_COMPUTED and not [k for k in logged.metrics if k.startswith("importance.")]
        [warning] = [r for r in node_log if r.levelno == logging.WARNING]
        assert "parameter importances not computed: 1 complete trial(s)" in warning.getMessage()


def test_the_node_says_when_there_is_no_study(tmp_path: Path) -> None:
    from pancreas_seg.pipelines.tuning.nodes import report_importances  # noqa: PLC0415

    params = _project_params()
    tuning = {**params["tuning"], "storage_dir": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match="run `kedro run --pipelines=tune_unet` first"):
        report_importances({}, params["training"], tuning, params["unet"]["architecture"])
