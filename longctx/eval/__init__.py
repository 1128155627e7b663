"""Evaluation: memory-lean, token-weighted perplexity at fixed context lengths, and streaming perplexity."""

from .perplexity import format_table, perplexity, save_json
from .streaming import streaming_perplexity

__all__ = ["perplexity", "streaming_perplexity", "save_json", "format_table"]
