"""Benchmarks: each function times one subsystem and writes a JSON file under results/."""
