"""Generation with a key/value cache (prefill, decode steps, sampling).

Imports `mmjax.models` only; evaluation builds on it."""
