"""On-demand benchmarks of lwc (never part of the test suite). Run from the repo root:

  python -m benchmarks.masked_step --data_dir=../shared/data/mnist

See benchmarks/README.md.
"""
