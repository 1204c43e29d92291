"""mergeflow: merge fine-tuned LLM experts (RegMean, averaging) in a cached DVC pipeline."""

__version__ = "0.1.0"
