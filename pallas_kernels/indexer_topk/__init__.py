"""Indexer scores + top-k: ``kernel.indexer_topk`` and ``reference.indexer_topk_reference``."""
