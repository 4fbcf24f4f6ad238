"""The ``cascade`` namespace: stage 2 trained on crops around the pancreas stage 1 finds."""
