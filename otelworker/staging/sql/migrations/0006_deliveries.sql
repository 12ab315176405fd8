-- Forwarding (issue 21): one delivery row per (destination, archived object), inserted in
-- the transaction that commits the object's manifest row, so an object is either in the
-- manifest with every delivery its destinations want, or in neither. The row copies what
-- the forwarder needs of the object (key, signal, tenant, sizes) so claiming and sending
-- never join export_batches. A delivery goes with its object's manifest row (prune).
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
