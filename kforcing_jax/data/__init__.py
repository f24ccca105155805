"""Input pipeline: tfds builders (embedded KJV corpus, local text files), tokenizers, grain."""
