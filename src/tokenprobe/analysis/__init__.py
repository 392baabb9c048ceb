"""Scoring probes and baselines on held-out positions: metrics, chunk bootstrap, baselines."""
