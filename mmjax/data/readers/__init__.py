"""Readers: one Grain source per on-disk format, each yielding raw records (see `mmjax.data.records`)."""
