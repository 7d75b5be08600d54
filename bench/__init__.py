"""Benchmark commands: each writes its results (JSON and Markdown) under bench/results/."""
