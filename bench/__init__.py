"""rankloop benchmarks: `make bench` (python -m bench). Each figure is printed as a ratio
against a baseline measured in the same run, on the same data."""
