"""dist-w2v: distributed skip-gram with negative sampling (d2l's word2vec) on PyTorch."""

__version__ = "0.1.0"
