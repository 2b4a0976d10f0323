"""Pretraining: DINO, DINO-vMF, iBOT, iBOT-vMF (see the pretraining issues)."""
