"""Speed benchmarks (`make bench`); see bench.py."""
