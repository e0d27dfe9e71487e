"""Evaluation: metrics, the sweep, the selection, the final and demo evaluations, transform comparison."""
