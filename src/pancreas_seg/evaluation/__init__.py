"""Evaluation in pure NumPy/SciPy/Matplotlib: 3D metrics (Dice, HD95, NSD), post-processing, plots.

Nothing in this package imports Kedro, Keras or MLflow.
"""
