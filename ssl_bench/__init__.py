"""ssl-bench: pretrain and benchmark self-supervised vision backbones in one harness."""

__version__ = "0.1.0"
