"""Attention: the FP8 attention (fp8.py) and cuDNN's FP8 attention (cudnn_fp8.py) that the attention
node offers as backends."""
