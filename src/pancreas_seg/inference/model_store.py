"""Find a trained model (or a fold ensemble) and the model card of each member.

The training pipeline saves ``<models_dir>/<arch>/model.keras/<version>/model.keras`` and
``<models_dir>/<arch>/model_card.json/<version>/model_card.json`` from one node, so both carry the
same Kedro version string. A model is only ever paired with the card of its own version. The
cascade also saves its stage 1 there (``cascade/stage1_model.keras/<version>/``).

The cross-validation pipeline saves one model per fold: ``<models_dir>/<arch>/folds/models/fold<k>.keras``
with ``<models_dir>/<arch>/folds/cards/fold<k>.json``; ``<arch>.ensemble`` names them together.
A *bundle* folder (how the registered ``champion`` is stored in MLflow) holds ``bundle.json``
listing its members' ``.keras`` and card files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pancreas_seg.inference.model_card import ModelCard
from pancreas_seg.models.names import CASCADE_NAME, MODEL_NAMES

if TYPE_CHECKING:
    from pancreas_seg.inference.predictor import PredictionSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A model file and its card (``card.version`` is the Kedro version or the MLflow reference).

    For the cascade, ``model_file`` is stage 2 and ``stage1_file`` stage 1 (None otherwise).
    """

    model_file: Path
    card: ModelCard
    stage1_file: Path | None = None


def _versions(folder: Path, filename: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.parent.name: p for p in folder.glob(f"*/{filename}") if p.is_file()}


ENSEMBLE_SUFFIX = ".ensemble"
SERVING_MODEL_NAME = "segmenter"
"""The name of the pyfunc model logged to each training run (``pancreas_seg.inference.serving.MODEL_NAME``)."""
BUNDLE_FILE = "bundle.json"


@dataclass(frozen=True)
class TrainedEnsemble:
    """Models whose softmax outputs are averaged: the folds of one cross-validation (``name``)."""

    name: str
    members: tuple[TrainedModel, ...]

    @property
    def cards(self) -> list[ModelCard]:
        return [member.card for member in self.members]


def members(trained: TrainedModel | TrainedEnsemble) -> tuple[TrainedModel, ...]:
    """The single model as a one-tuple, or the ensemble's members."""
    return trained.members if isinstance(trained, TrainedEnsemble) else (trained,)


def fold_models(models_dir: str | Path, architecture: str) -> TrainedEnsemble:
    """The fold models of ``architecture``'s last cross-validation (``<arch>/folds/``) as an ensemble.

    The cascade's fold k (``cascade/folds/``: stage 2) takes its stage 1 from the stage-1
    architecture's fold model k (``unet/folds/models/fold<k>.keras``, as its card records); the
    weights hashes in the card bind the pair when the predictor loads them.
    """
    root = Path(models_dir) / architecture / "folds"
    model_files = sorted((root / "models").glob("fold*.keras"))
    if not model_files:
        raise FileNotFoundError(f"no cross-validation fold models of '{architecture}' under {root / 'models'}; "
                                f"run `kedro run --pipelines=cv_{architecture}` first")
    trained = []
    for model_file in model_files:
        card_file = root / "cards" / f"{model_file.stem}.json"
        if not card_file.is_file():
            raise FileNotFoundError(f"{model_file}: its model card {card_file} is missing; rerun the cv pipeline")
        card = ModelCard.from_json(card_file.read_text(), str(card_file),
                                   version=f"{architecture}{ENSEMBLE_SUFFIX}/{model_file.stem}")
        stage1_file = None
        if card.cascade is not None:
            stage1 = card.cascade.stage1
            stage1_file = (Path(models_dir) / str(stage1.get("architecture")) / "folds" / "models"
                           / f"fold{stage1.get('fold')}.keras")
            if stage1.get("fold") is None or not stage1_file.is_file():
                raise FileNotFoundError(f"{model_file}: the stage-1 fold model of this cascade ({stage1_file}) is "
                                        "missing; rerun `kedro run --pipelines=cv_cascade`")
        trained.append(TrainedModel(model_file, card, stage1_file))
    return TrainedEnsemble(f"{architecture}{ENSEMBLE_SUFFIX}", tuple(trained))


BUNDLE_IN_MLFLOW_MODEL = ("artifacts", "bundle")
"""Where a bundle lies inside an MLflow pyfunc model folder (see :mod:`pancreas_seg.inference.serving`)."""


def write_bundle(folder: str | Path, name: str, trained: TrainedModel | TrainedEnsemble,
                 prediction_settings: Mapping[str, Any], serving_settings: Mapping[str, Any] | None = None) -> Path:
    """Copy a model (or the members of an ensemble) with their cards into ``folder`` as a bundle.

    The bundle is ``bundle.json`` (kind, name, members, the prediction settings to apply by
    default and, when given, the served model's limits: ``serving_settings``, see
    :mod:`pancreas_seg.inference.serving_settings`) next to each member's ``.keras`` file, card
    and, for the cascade, stage-1 file. Returns ``folder``.
    """
    import shutil  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, member in enumerate(members(trained)):
        stem = f"member{index}"
        shutil.copyfile(member.model_file, folder / f"{stem}.keras")
        (folder / f"{stem}.json").write_text(member.card.to_json())
        entry = {"model": f"{stem}.keras", "card": f"{stem}.json"}
        if member.stage1_file is not None:
            shutil.copyfile(member.stage1_file, folder / f"{stem}_stage1.keras")
            entry["stage1"] = f"{stem}_stage1.keras"
        entries.append(entry)
    kind = "ensemble" if isinstance(trained, TrainedEnsemble) else "single"
    index = {"kind": kind, "name": name, "members": entries, "prediction_settings": dict(prediction_settings)}
    if serving_settings is not None:
        index["serving_settings"] = dict(serving_settings)
    (folder / BUNDLE_FILE).write_text(json.dumps(index, indent=2))
    return folder


def _bundle_folder(folder: Path) -> Path:
    """``folder`` itself, or the bundle inside an MLflow pyfunc model folder."""
    if not (folder / BUNDLE_FILE).is_file() and (folder.joinpath(*BUNDLE_IN_MLFLOW_MODEL) / BUNDLE_FILE).is_file():
        return folder.joinpath(*BUNDLE_IN_MLFLOW_MODEL)
    return folder


def read_bundle_settings(folder: str | Path, reference: str) -> PredictionSettings:
    """The prediction settings a bundle was logged with (the ``inference`` parameters of its run)."""
    from pancreas_seg.inference.predictor import PredictionSettings  # noqa: PLC0415 - predictor imports this module

    index_file = _bundle_folder(Path(folder)) / BUNDLE_FILE
    settings = json.loads(index_file.read_text()).get("prediction_settings")
    if not settings:
        raise ValueError(f"{reference}: {index_file} records no prediction settings (logged by an earlier "
                         "version of pancreas_seg); retrain the model to log it again")
    return PredictionSettings.from_params(settings)


def read_bundle_serving_settings(folder: str | Path) -> dict[str, Any]:
    """The served model's limits a bundle was logged with (the ``inference.serving`` parameters of
    its run); empty for a bundle logged without them (the defaults then apply)."""
    index_file = _bundle_folder(Path(folder)) / BUNDLE_FILE
    return dict(json.loads(index_file.read_text()).get("serving_settings") or {})


def read_bundle(folder: str | Path, reference: str) -> TrainedModel | TrainedEnsemble:
    """A model or ensemble stored as a bundle folder (``bundle.json`` + its members' files), or an
    MLflow pyfunc model folder holding one (``artifacts/bundle/``)."""
    folder = _bundle_folder(Path(folder))
    index_file = folder / BUNDLE_FILE
    if not index_file.is_file():
        raise FileNotFoundError(f"{reference}: no {BUNDLE_FILE} in {folder} (not a pancreas_seg model bundle)")
    index = json.loads(index_file.read_text())
    trained = []
    for member in index["members"]:
        model_file, card_file = folder / member["model"], folder / member["card"]
        stage1_file = folder / member["stage1"] if member.get("stage1") else None
        if not (model_file.is_file() and card_file.is_file()) or (stage1_file and not stage1_file.is_file()):
            raise FileNotFoundError(f"{reference}: bundle member {member} is missing from {folder}")
        card = ModelCard.from_json(card_file.read_text(), f"{reference}: {member['card']}", version=reference)
        trained.append(TrainedModel(model_file, card, stage1_file))
    if index["kind"] == "ensemble":
        return TrainedEnsemble(str(index["name"]), tuple(trained))
    return trained[0]


def latest_trained_model(models_dir: str | Path, architecture: str) -> TrainedModel:
    """The newest model version of ``architecture`` in ``models_dir`` with the card of that version."""
    root = Path(models_dir) / architecture
    models = _versions(root / "model.keras", "model.keras")
    if not models:
        raise FileNotFoundError(f"no trained '{architecture}' model under {root / 'model.keras'}; run "
                                f"`kedro run --pipelines=train_{architecture}` first")
    version = max(models)
    cards = _versions(root / "model_card.json", "model_card.json")
    if version not in cards:
        raise FileNotFoundError(f"{models[version]}: no model card of the same version "
                                f"({root / 'model_card.json' / version / 'model_card.json'} is missing); "
                                "the model cannot be used without it. Retrain it.")
    card = ModelCard.from_json(cards[version].read_text(), str(cards[version]), version=version)
    stage1_file = None
    if architecture == CASCADE_NAME:
        stage1_file = root / "stage1_model.keras" / version / "stage1_model.keras"
        if not stage1_file.is_file():
            raise FileNotFoundError(f"{models[version]}: the cascade's stage-1 model of the same version "
                                    f"({stage1_file}) is missing; retrain the cascade.")
    return TrainedModel(models[version], card, stage1_file)


def run_model(reference: str) -> TrainedModel | TrainedEnsemble:
    """The model of an MLflow run: ``runs:/<run_id>`` (its logged pyfunc model ``segmenter``) or
    ``runs:/<run_id>/<logged model name>``. Runs logged before models were pyfunc models (plain
    ``keras/*.keras`` + ``model_card.json`` artifacts) still resolve."""
    import mlflow  # noqa: PLC0415

    parts = reference.removeprefix("runs:/").strip("/").split("/", 1)
    run_id, model_name = parts[0], parts[1] if len(parts) > 1 else SERVING_MODEL_NAME
    try:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{model_name}")
        return read_bundle(folder, reference)
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        if len(parts) > 1:
            raise FileNotFoundError(f"{reference}: no logged model {model_name!r} in that run ({exc})") from exc
    return _legacy_run_model(reference, run_id)


def _legacy_run_model(reference: str, run_id: str) -> TrainedModel:
    """A run of an earlier version: ``keras/<architecture>.keras`` (or stage1/stage2) + ``model_card.json``."""
    import mlflow  # noqa: PLC0415

    try:
        run_root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/"))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise FileNotFoundError(f"{reference}: the run has no model ({exc})") from exc
    card_file = run_root / "model_card.json"
    if not card_file.is_file():
        raise FileNotFoundError(f"{reference}: the run has no logged model '{SERVING_MODEL_NAME}' and no "
                                "model_card.json artifact (is it a training run of this project?)")
    card = ModelCard.from_json(card_file.read_text(), f"{reference}: model_card.json", version=reference)
    if card.is_cascade:
        stage1, stage2 = run_root / "keras" / "stage1.keras", run_root / "keras" / "stage2.keras"
        if not (stage1.is_file() and stage2.is_file()):
            raise FileNotFoundError(f"{reference}: expected artifacts keras/stage1.keras and keras/stage2.keras")
        return TrainedModel(stage2, card, stage1)
    models = sorted(run_root.glob("keras/*.keras"))
    if not models:
        raise FileNotFoundError(f"{reference}: expected the artifact keras/<architecture>.keras")
    return TrainedModel(models[0], card)


def resolve_model(reference: str | Sequence[str], models_dir: str | Path) -> TrainedModel | TrainedEnsemble:
    """Return local ``.keras`` file(s) and model card(s) for a model reference.

    Args:
        reference: ``unet`` / ``unet_small`` / ``fcn`` / ``vnet2d`` / ``cascade`` (the newest model
            version in ``models_dir``); ``<architecture>.ensemble`` (the fold models of its last
            cross-validation); ``runs:/<run_id>`` of a model's nested MLflow run;
            ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the MLflow model registry,
            e.g. ``models:/pancreas_seg@champion``); or a list of single-model references, whose
            softmax outputs are averaged.
        models_dir: the project's ``data/06_models``.
    """
    if not isinstance(reference, str):
        parts = [resolve_model(str(r), models_dir) for r in reference]
        if not parts or any(isinstance(p, TrainedEnsemble) for p in parts):
            raise ValueError(f"inference.model {list(reference)!r}: a list must name one or more single models")
        return TrainedEnsemble("+".join(str(r) for r in reference), tuple(parts))
    if reference.endswith(ENSEMBLE_SUFFIX) and reference[:-len(ENSEMBLE_SUFFIX)] in MODEL_NAMES:
        return fold_models(models_dir, reference[:-len(ENSEMBLE_SUFFIX)])
    if reference.startswith("models:/"):
        import mlflow  # noqa: PLC0415

        return read_bundle(mlflow.artifacts.download_artifacts(artifact_uri=reference), reference)
    if reference in MODEL_NAMES:
        return latest_trained_model(models_dir, reference)
    if reference.startswith("runs:/"):
        return run_model(reference)
    raise ValueError(f"inference.model {reference!r}: use a model name {list(MODEL_NAMES)}, "
                     f"<architecture>{ENSEMBLE_SUFFIX}, an MLflow URI runs:/<run_id> or models:/<name>@<alias>, "
                     "or a list of them")
