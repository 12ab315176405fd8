"""Pick the object store from the settings: S3 when S3_BUCKET is set, else a local directory."""

from __future__ import annotations

from otelworker.settings import Settings
from otelworker.sinks.base import ObjectStore
from otelworker.sinks.local import LocalObjectStore
from otelworker.sinks.s3 import S3ObjectStore


async def open_store(settings: Settings) -> ObjectStore:
    if settings.s3_bucket:
        return await S3ObjectStore.open(settings)
    return LocalObjectStore(settings.local_object_dir)
