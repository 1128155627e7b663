"""Evaluation: memory-lean, token-weighted perplexity at fixed context lengths."""

from .perplexity import format_table, perplexity, save_json

__all__ = ["perplexity", "save_json", "format_table"]
