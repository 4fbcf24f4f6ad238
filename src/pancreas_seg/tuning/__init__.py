"""Hyperparameter search with Optuna (no Kedro imports; Keras only inside a trial).

* :mod:`.search_space`: the search space from configuration, sampling, range checks.
* :mod:`.config`: ``TuningConfig``, the ``tuning`` parameters of one architecture.
* :mod:`.storage`: the journal-file storage with heartbeats, stale-trial recovery and retry,
  the claim lock that starts exactly ``n_trials`` trials across processes.
* :mod:`.objective`: one trial = one short training run with the training pipeline's parts,
  logged to a nested MLflow run.
* :mod:`.pruning`: the Keras callback that reports each epoch's validation Dice to the pruner.
* :mod:`.workers`: the worker processes and the rounds that drive a study to ``n_trials``.
* :mod:`.report`: the trials table, the best trial and the study figure.

See ``docs/tuning.md``.
"""
