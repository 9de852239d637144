"""Data: raw files to records (prepare, clean), records to tokens (formats), tokens to batches (loader)."""
