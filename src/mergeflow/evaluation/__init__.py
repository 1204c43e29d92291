"""Evaluation with lm-eval: shipped task YAMLs, the HF backend, flattened DVC metrics."""
