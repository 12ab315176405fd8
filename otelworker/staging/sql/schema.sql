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
    tenant           text
);

CREATE INDEX export_batches_created_idx ON export_batches (signal, created_at);
