-- The archive's Parquet copy (issue 23): one row per Parquet file, inserted in the
-- transaction that marks its source manifest rows compacted (export_batches.compacted_at),
-- so a manifest row's records are in exactly one recorded file, or in none yet.
CREATE TABLE parquet_files (
    file_id          uuid        PRIMARY KEY,
    tenant           text        NOT NULL,
    table_name       text        NOT NULL,
    object_key       text        NOT NULL UNIQUE,
    row_count        bigint      NOT NULL CHECK (row_count >= 0),
    compressed_bytes bigint      NOT NULL CHECK (compressed_bytes >= 0),
    min_time         timestamptz,
    max_time         timestamptz,
    service_names    text[]      NOT NULL DEFAULT '{}',
    source_batches   uuid[]      NOT NULL,
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    schema_version   integer     NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- The query's selection: a tenant's files of a table whose data overlaps a time range.
CREATE INDEX parquet_files_select_idx ON parquet_files (tenant, table_name, min_time);

-- prune --parquet: files recorded before a cut.
CREATE INDEX parquet_files_created_idx ON parquet_files (created_at);

ALTER TABLE export_batches ADD COLUMN compacted_at timestamptz;

-- The compactor's work: the manifest rows not compacted yet, by arrival.
CREATE INDEX export_batches_uncompacted_idx
    ON export_batches (signal, created_at)
    WHERE compacted_at IS NULL;
