"""Compressed sparse attention: ``kernel.sparse_attention`` and ``reference.sparse_attention_reference``."""
