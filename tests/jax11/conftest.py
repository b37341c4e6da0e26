"""Tests of code written for JAX 0.11's Mosaic GPU API (the GPU machine's JAX). The CPU machines'
JAX 0.10 has another Mosaic GPU API, so under it these files are not collected; `.ci/run` runs
them under JAX 0.11.2 where a Python 3.12 is installed."""
import jax

_version = tuple(int(p) for p in jax.__version__.split(".")[:2])
collect_ignore_glob = ["test_*.py"] if _version < (0, 11) else []
