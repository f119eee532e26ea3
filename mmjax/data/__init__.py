"""Data: procedural default dataset, tokenizer, example building, Grain pipeline."""
