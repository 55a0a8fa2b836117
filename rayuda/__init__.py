"""rayuda: find the best unsupervised-domain-adaptation recipe for semantic segmentation on your own target data."""

__version__ = "0.1.0"
