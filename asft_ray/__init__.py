"""asft-ray: adaptive sparse fine-tuning of large language models on Ray."""

__version__ = "0.1.0"
