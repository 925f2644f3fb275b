"""Checks on what the build produced: the apps' contract (names, shapes, dtypes), and numerical fidelity."""
