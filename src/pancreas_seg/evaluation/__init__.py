"""Evaluation in pure NumPy/SciPy/Matplotlib: 3D metrics (Dice, HD95, NSD), post-processing, plots,
paired statistical comparison of models (Wilcoxon, bootstrap CI, Holm).

Nothing in this package imports Kedro, Keras or MLflow.
"""
