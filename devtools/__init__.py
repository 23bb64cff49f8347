"""Development helpers shared by ``tests/`` and ``benchmarks/``; not part of the compbias package (never shipped).

:mod:`devtools.services` starts real services on loopback (MLflow servers,
PostgreSQL, Ray clusters) for the scale-out tests and benchmarks. Both import
it from the repository root (``python -m pytest``, or a script that puts the
root on ``sys.path``), so neither reaches into the other's tree.
"""
