"""Load tests and benchmarks of capaserve (Locust scenario, `run`, `bench_merge`, `bench_mixed`).

Installed with capaserve as the `loadtest` package, so each script runs as
`python loadtest/<name>.py` from a checkout, or `python -m loadtest.<name>` anywhere,
without touching sys.path; Locust itself comes with the `loadtest` extra.
"""
