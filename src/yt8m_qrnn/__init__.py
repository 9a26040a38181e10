"""Reproduction of "An attempt at large scale multi-label video classification using the QRNN architecture"."""
