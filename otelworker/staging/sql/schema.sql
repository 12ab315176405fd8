-- The whole current schema, as the migrations leave it (tests/migration checks they agree).
CREATE TABLE ingestion_queue (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    signal           text        NOT NULL CHECK (signal IN ('traces', 'metrics', 'logs')),
    payload          bytea       NOT NULL,
    record_count     integer     NOT NULL CHECK (record_count >= 0),
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'processing', 'failed', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    available_at     timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    lease_token      uuid,
    received_at      timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    payload_encoding text        NOT NULL DEFAULT 'identity'
                                 CHECK (payload_encoding IN ('identity', 'gzip', 'zstd')),
    raw_bytes        integer,
    min_time_ns      bigint,
    max_time_ns      bigint,
    service_names    text[],
    tenant           text,
    payload_crc      bigint
);

ALTER TABLE ingestion_queue ALTER COLUMN payload SET STORAGE EXTERNAL;

CREATE INDEX ingestion_queue_claimable_idx
    ON ingestion_queue (id)
    WHERE status IN ('pending', 'failed', 'processing');

CREATE TABLE export_batches (
    batch_id         uuid        PRIMARY KEY,
    signal           text        NOT NULL CHECK (signal IN ('traces', 'metrics', 'logs')),
    object_key       text        NOT NULL UNIQUE,
    item_count       integer     NOT NULL,
    record_count     bigint      NOT NULL,
    compressed_bytes bigint      NOT NULL,
    raw_bytes        bigint      NOT NULL,
    min_time         timestamptz,
    max_time         timestamptz,
    service_names    text[]      NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    tenant           text,
    compacted_at     timestamptz
);

CREATE INDEX export_batches_created_idx ON export_batches (signal, created_at);

-- The compactor's work: the manifest rows not compacted yet, by arrival.
CREATE INDEX export_batches_uncompacted_idx
    ON export_batches (signal, created_at)
    WHERE compacted_at IS NULL;

CREATE TABLE deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination      text        NOT NULL,
    batch_id         uuid        NOT NULL REFERENCES export_batches (batch_id) ON DELETE CASCADE,
    object_key       text        NOT NULL,
    signal           text        NOT NULL CHECK (signal IN ('traces', 'metrics', 'logs')),
    tenant           text        NOT NULL,
    record_count     bigint      NOT NULL,
    raw_bytes        bigint      NOT NULL,
    compressed_bytes bigint      NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'processing', 'delivered', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_token      uuid,
    lease_expires_at timestamptz,
    last_status      text,
    last_error       text        CHECK (char_length(last_error) <= 2000),
    last_attempt_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    rejected_records bigint      NOT NULL DEFAULT 0,
    UNIQUE (destination, batch_id)
);

-- The claim: a destination's rows due (pending whose next attempt has come; processing
-- whose lease has expired: a claimed row's next_attempt_at is its lease's end).
CREATE INDEX deliveries_claimable_idx
    ON deliveries (destination, next_attempt_at)
    WHERE status IN ('pending', 'processing');

-- The manifest row's cascade and prune's "does a destination still want it".
CREATE INDEX deliveries_batch_idx ON deliveries (batch_id);

-- The dead count per destination (metrics, the destinations command).
CREATE INDEX deliveries_dead_idx ON deliveries (destination) WHERE status = 'dead';

-- Objects `prune --force` deleted while a destination had not taken them, per destination
-- (otelworker_forward_lost_objects_total, the destinations command): a running total.
CREATE TABLE delivery_losses (
    destination  text        PRIMARY KEY,
    objects      bigint      NOT NULL DEFAULT 0,
    last_lost_at timestamptz NOT NULL DEFAULT now()
);

-- The archive's Parquet copy (issue 23): one row per file, inserted in the transaction that
-- marks its source manifest rows compacted.
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
