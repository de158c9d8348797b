"""Durable run storage (`--storage URI`): an S3 prefix or a shared directory, through pyarrow.fs.

store.py reaches the store (credentials, retries, errors); runs.py lays a run out on it
(config first, each checkpoint manifest-last, the finished run manifest-last).
"""
