"""Typed-vs-spoken evaluation: scoring rules by task (scoring.py), the report over
many samples (report.py) with each benchmark's own metrics (benchmarks.py), the evaluation loop that
answers every sample both ways (harness.py), attention shares (attention.py) and plots
(plots.py)."""
