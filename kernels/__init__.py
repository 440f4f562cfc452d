"""Triton kernels for T5 (RMSNorm, gated FFN, relative-bias flash attention) and their PyTorch references.

Imports only torch and triton."""
