"""The benchmark behind `make bench` (jobs/bench.py): its workloads, baselines, timed runs and
parts, each in a module of its own."""
