"""The object-store port and the object key layout."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from otelworker.settings import Compression

EXTENSIONS = {
    Compression.GZIP: ".binpb.gz",
    Compression.ZSTD: ".binpb.zst",
    Compression.NONE: ".binpb",
}


def object_key(
    prefix: str,
    signal: str,
    batch_id: uuid.UUID,
    at: datetime,
    compression: Compression,
    tenant: str | None = None,
) -> str:
    """The OpenTelemetry Collector awss3exporter layout for ``otlp_proto``, per tenant.

    ``{prefix}/{tenant}/year=YYYY/month=MM/day=DD/hour=HH/minute=mm/{signal}_{uuid}.binpb[.gz|.zst]``
    (UTC), so that the Collector's awss3receiver replays one tenant's objects with
    ``s3_prefix: {prefix}/{tenant}``. The tenant name is validated at the door (no ``/``,
    no ``..``); ``tenant=None`` is the layout of objects stored before tenants.
    """
    partition = at.strftime("year=%Y/month=%m/day=%d/hour=%H/minute=%M")
    name = f"{signal}_{batch_id}{EXTENSIONS[compression]}"
    parts = [p for p in (prefix.strip("/"), tenant) if p]
    return "/".join([*parts, partition, name])


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    last_modified: datetime
    size: int


class ObjectStore(Protocol):
    """What the pipeline needs of an object store."""

    async def put(
        self, key: str, body: bytes, content_type: str, content_encoding: str | None
    ) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> AsyncIterator[StoredObject]: ...

    async def close(self) -> None: ...
