"""Decoding: the KV-cache decode algorithm, the engine and quality evaluation."""
