"""A Parquet file of the columnar copy: as compaction writes it, and as its
``parquet_files`` row holds it (what ``query`` and ``verify`` select). No pyarrow here."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class ParquetFile:
    """A file written and uploaded: the ``parquet_files`` columns the file itself gives."""

    file_id: uuid.UUID
    tenant: str
    table_name: str
    object_key: str
    row_count: int
    compressed_bytes: int
    min_time: datetime | None
    max_time: datetime | None
    service_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ParquetFileRow(ParquetFile):
    """One ``parquet_files`` row: the file, and what it was compacted from."""

    source_batches: tuple[uuid.UUID, ...]
    window_start: datetime
    window_end: datetime
    schema_version: int

    @classmethod
    def from_row(cls, row: Any) -> ParquetFileRow:
        return cls(
            row["file_id"],
            row["tenant"],
            row["table_name"],
            row["object_key"],
            int(row["row_count"]),
            int(row["compressed_bytes"]),
            row["min_time"],
            row["max_time"],
            tuple(row["service_names"] or ()),
            tuple(row["source_batches"] or ()),
            row["window_start"],
            row["window_end"],
            int(row["schema_version"]),
        )
