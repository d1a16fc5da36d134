"""Studies: arms x seeds trained resumably, compared paired by seed (``polytask study run/report``).

Modules: :mod:`~polytask.study.spec` (the study file), :mod:`~polytask.study.runner` (``study run``),
:mod:`~polytask.study.worker` (one run, in its own process), :mod:`~polytask.study.stats` (paired
statistics) and :mod:`~polytask.study.report` (``study report``). Nothing is imported here, so that
``python -m polytask.study.worker`` starts its module cleanly.
"""
