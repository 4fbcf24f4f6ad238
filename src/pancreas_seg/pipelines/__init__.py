"""Kedro pipelines: thin nodes around the domain packages, and their wiring."""
