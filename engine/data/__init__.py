"""Data: tokenization, C4 reading, pretraining objectives, packing, the built-in corpus."""
