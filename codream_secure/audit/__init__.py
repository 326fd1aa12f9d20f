"""Privacy audits that `codream-secure bench` runs: leakage attacks, overhead suites, reports.

`leakage` (what an attacker learns), `overhead` (what secure aggregation costs, against Flower's
SecAgg+), `device` (the GPU dream-step and round benchmark), `reporting` (the one report writer
every benchmark uses). The runnable scripts in the checkout's benchmarks/ folder import from here.
"""
