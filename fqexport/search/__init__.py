"""Fairness-aware mixed precision: per-group sensitivity, allocation under a budget, the
verified search and the Pareto sweep."""
