"""Attention: the FP8 attention (fp8.py) that the attention node offers as a backend."""
