"""Models: tokenizers, HF loading and identity, student shapes, windows and batching."""
