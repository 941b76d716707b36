"""Numerical operators with a short PyTorch reference beside every fast implementation."""
