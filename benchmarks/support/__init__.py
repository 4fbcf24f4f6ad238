"""Development helpers shared by ``tests/`` and ``benchmarks/``; not installed with ``pancreas_seg``.

* :mod:`benchmarks.support.project_copy`: a throwaway copy of this Kedro project (``conf/``, an
  empty ``src/``, the ``data/`` skeleton) and the environment of a process that runs in it.
* :mod:`benchmarks.support.local_server`: a server process on 127.0.0.1 (``mlflow server``,
  ``mlflow models serve``): start, wait until it answers, stop.

Why here and not in ``src/`` or in a package of its own: these modules serve only the test suite
and the benchmarks, so they must not ship in the wheel, and the benchmarks (which run as
``python -m benchmarks.<name>`` from the repository root) and pytest (``pythonpath = ["."]``)
already share one import root, the repository root. A sub-package of ``benchmarks`` is importable
from both with a plain ``import`` and no further path set-up or install step; a separate top-level
package (for example ``devtools/``) would need its own ``sys.path`` entry for the benchmarks.
"""
