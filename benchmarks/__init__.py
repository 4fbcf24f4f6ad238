"""Benchmarks and checks of the project, and the development helpers they share with ``tests/``.

Development only: this package is not part of the installed ``pancreas_seg`` distribution
(``[tool.setuptools.packages.find]`` looks under ``src/`` alone). It is imported from the
repository root, which is on ``sys.path`` when

* a benchmark runs as a module from the repository root, e.g.
  ``.venv/bin/python -m benchmarks.inference_benchmark --help``;
* pytest runs (``[tool.pytest.ini_options] pythonpath = ["."]`` in ``pyproject.toml``).

:mod:`benchmarks.support` holds what tests and benchmarks both use; ``_common`` and ``_scale``
are the benchmarks' own helpers. Importing this package imports nothing else.
"""
