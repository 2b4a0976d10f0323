"""Evaluation protocols, one module each; every module registers itself with ``ssl_bench.registry``."""
