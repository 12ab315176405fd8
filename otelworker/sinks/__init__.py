"""Sinks: where batches go. An object-store port with S3 and filesystem adapters."""
