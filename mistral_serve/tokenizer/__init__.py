"""Tokenizers (mistral-common for Mistral checkpoints, HF for others) and streaming detokenization."""

from mistral_serve.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
