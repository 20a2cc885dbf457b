"""Benchmarks: `python -m asyncpolicy bench [SUITE ...] [--quick] [key=value ...]`.

Each suite measures one claim users choose asyncpolicy for (throughput, overlap, channel cost,
event-loop responsiveness, learning speed) by running the project's own pieces (Supervisor,
load_config, VersionedChannel, metrics.jsonl) — never a re-implementation of them — and returns a
`SuiteResult`; `report.py` turns the results into `benchmark_results_<time>/`. CPU timings are
noisy, so every comparison is made side by side in one process and reported as a ratio.
"""
