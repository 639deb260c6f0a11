"""Stress scripts: bounded, self-stopping runs with printed figures (`make stress`).

The test suite runs each of them small; run them large by hand:
    .venv/bin/python -m tests.stress.chaos --operations 5000
    .venv/bin/python -m tests.stress.random_kills --repetitions 20
"""
