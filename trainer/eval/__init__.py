"""Typed-vs-spoken evaluation: scoring rules by task (scoring.py), the evaluation loop that
answers every sample both ways (harness.py), attention shares (attention.py) and plots
(plots.py)."""
