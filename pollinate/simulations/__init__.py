"""Local multi-client runs on Flower's simulation engine, scenarios and benchmarks."""
