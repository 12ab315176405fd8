-- Decode once, stage compressed: each row carries what its flush needs (size, time range,
-- service names) beside its payload, which is stored in the object's codec, so that a
-- flush joins stored bytes instead of decoding and compressing them again. Converts
-- nothing in place: rows staged before keep 'identity' and no facts, and their flush
-- decodes them as before. Constant defaults and NULL columns: no table rewrite.
ALTER TABLE ingestion_queue
    ADD COLUMN payload_encoding text NOT NULL DEFAULT 'identity'
        CHECK (payload_encoding IN ('identity', 'gzip', 'zstd')),
    ADD COLUMN raw_bytes integer,
    ADD COLUMN min_time_ns bigint,
    ADD COLUMN max_time_ns bigint,
    ADD COLUMN service_names text[];
