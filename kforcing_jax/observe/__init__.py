"""What a user sees: JSONL/TensorBoard metrics, the console log, progress and plots."""
