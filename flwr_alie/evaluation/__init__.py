"""Evaluation of robust aggregation under ALIE: task, strategies, grid, results."""
