"""Using a trained model: its typed card, where it is stored, and the one predictor that every
path (evaluation, cross-validation, the cascade, the inference pipeline, the served MLflow model,
the benchmarks) segments scans with."""
