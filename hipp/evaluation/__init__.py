"""Measuring models and plans: metrics, Pareto sweeps, the bench against baselines, model cards."""
