-- Every query otelworker runs, each under a `-- name: NAME --` header.

-- name: create_migrations_table --
CREATE TABLE IF NOT EXISTS otelworker_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migration_lock --
-- Serialises migrations across replicas that start at once (held to the end of the transaction).
SELECT pg_advisory_xact_lock(hashtext('otelworker.migrations'));

-- name: applied_migrations --
SELECT version FROM otelworker_migrations ORDER BY version;

-- name: record_migration --
INSERT INTO otelworker_migrations (version, name) VALUES ($1, $2);

-- name: schema_version --
SELECT coalesce(max(version), 0) FROM otelworker_migrations;

-- name: stage_many --
-- One multi-row insert per group commit, in one statement and so one round trip: its
-- own transaction, committed before the reply. The statement also sends one wake-up to
-- idle pollers (delivered at commit) and returns the transaction id, which the backlog
-- figure compares with its count's snapshot so a commit is never counted twice.
-- Each row's facts ride along ($4..$8: encoding, decompressed size, time range, service
-- names joined by U+001F, one string per row since arrays of arrays do not unnest), its
-- tenant ($9) and the CRC-32 of its stored bytes ($10).
WITH staged AS (
    INSERT INTO ingestion_queue (signal, payload, record_count, payload_encoding, raw_bytes,
                                 min_time_ns, max_time_ns, service_names, tenant, payload_crc)
    SELECT s, p, r, coalesce(e, 'identity'), b, lo, hi, string_to_array(n, E'\x1f'), t, c
    FROM unnest($1::text[], $2::bytea[], $3::integer[], $4::text[], $5::integer[],
                $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::bigint[])
         AS u(s, p, r, e, b, lo, hi, n, t, c)
)
SELECT pg_notify('otelworker_staged', ''), pg_current_xact_id()::text;

-- name: backlog --
-- Items staged and not yet exported: pending, processing and failed (dead rows excluded),
-- in all and per tenant (NULL: $1, DEFAULT_TENANT). With the snapshot the count saw, so
-- commits made while it ran are told apart; and, in the same scan, the dead rows and the
-- age in seconds of the oldest item not yet exported.
WITH per_tenant AS (
    SELECT coalesce(tenant, $1) AS tenant,
           count(*) FILTER (WHERE status <> 'dead') AS items,
           count(*) FILTER (WHERE status = 'dead') AS dead,
           min(received_at) FILTER (WHERE status <> 'dead') AS oldest
    FROM ingestion_queue
    GROUP BY 1
)
SELECT coalesce(sum(items), 0)::bigint,
       pg_current_snapshot()::text,
       coalesce(sum(dead), 0)::bigint,
       coalesce(extract(epoch FROM now() - min(oldest)), 0)::float8,
       coalesce(array_agg(tenant) FILTER (WHERE items > 0), '{}'),
       coalesce(array_agg(items) FILTER (WHERE items > 0), '{}')
FROM per_tenant;

-- name: claim --
-- Claim up to $1 available rows: pending, failed whose backoff has passed, or
-- processing whose lease has expired (a crashed or stalled worker's); and only as many,
-- in id order, as start within $4 payload bytes (the first always, so a payload larger
-- than the budget still moves); with each row's tenant (NULL: $5, DEFAULT_TENANT). octet_length reads the out-of-line value's size from its
-- TOAST pointer, without fetching it. Never a row this worker holds ($6: the ids in its
-- buffer, which its renewer keeps leased): after a stall past the lease, the claim could
-- otherwise take back its own rows before the renewer extends them. A row of this
-- worker's token that it does not hold (a claim whose answer was lost) stays claimable.
WITH candidates AS (
    SELECT id, octet_length(payload) AS size FROM ingestion_queue
    WHERE status IN ('pending', 'failed', 'processing')
      AND ((status <> 'processing' AND available_at <= now())
           OR (status = 'processing' AND lease_expires_at < now()
               AND NOT (lease_token = $3 AND id = ANY($6::bigint[]))))
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT id FROM (
        SELECT id, sum(size) OVER (ORDER BY id) - size AS before FROM candidates
    ) running
    WHERE before < $4
)
UPDATE ingestion_queue q
SET status = 'processing',
    lease_expires_at = now() + make_interval(secs => $2),
    lease_token = $3
FROM chosen c
WHERE q.id = c.id
RETURNING q.id, q.signal, q.payload, q.record_count, q.attempts, q.payload_encoding,
          q.raw_bytes, q.min_time_ns, q.max_time_ns, q.service_names, q.payload_crc,
          coalesce(q.tenant, $5) AS tenant;

-- name: renew_leases --
UPDATE ingestion_queue
SET lease_expires_at = now() + make_interval(secs => $2)
WHERE id = ANY($1::bigint[]) AND lease_token = $3 AND status = 'processing';

-- name: insert_manifest --
-- The manifest row and, in the same statement (so the same transaction and round trip),
-- one delivery per destination named in $12 (those that want the object's signal and
-- tenant), and one wake-up of the forwarders, naming those destinations, at commit.
WITH manifest AS (
    INSERT INTO export_batches (batch_id, signal, object_key, item_count, record_count,
                                compressed_bytes, raw_bytes, min_time, max_time,
                                service_names, tenant)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    RETURNING batch_id, signal, object_key, record_count, raw_bytes, compressed_bytes, tenant
), handed AS (
    INSERT INTO deliveries (destination, batch_id, object_key, signal, tenant, record_count,
                            raw_bytes, compressed_bytes)
    SELECT d, m.batch_id, m.object_key, m.signal, coalesce(m.tenant, 'default'),
           m.record_count, m.raw_bytes, m.compressed_bytes
    FROM manifest m, unnest($12::text[]) AS d
    RETURNING destination
)
SELECT pg_notify('otelworker_deliveries', string_agg(destination, ','))
FROM handed
HAVING count(*) > 0;

-- name: delete_claimed --
-- Rows whose lease has passed to another worker are not ours to delete: the caller
-- compares the count and rolls back.
-- With the transaction's id, so that the backlog figure of an ingress in the same process
-- subtracts the deleted rows until a count sees them gone.
WITH deleted AS (
    DELETE FROM ingestion_queue
    WHERE id = ANY($1::bigint[]) AND lease_token = $2 AND status = 'processing'
    RETURNING 1
)
SELECT count(*), pg_current_xact_id()::text FROM deleted;

-- name: fail_claimed --
-- Failed rows wait an exponential backoff with full jitter. A failure that counts ($7: the
-- store or the database refused the batch itself) is one of the rows' attempts, the
-- backoff grows with them, and past $4 of them a row is dead. An outage ($7 false: the
-- store or the database unreachable, timing out, failing) is not the rows': attempts stay,
-- no row dies of it, and the backoff's exponent is $8, the worker's run of outage failures.
UPDATE ingestion_queue
SET attempts = attempts + CASE WHEN $7::boolean THEN 1 ELSE 0 END,
    status = CASE WHEN $7::boolean AND attempts + 1 >= $4 THEN 'dead' ELSE 'failed' END,
    available_at = now() + make_interval(secs => random() * least(
        $6::double precision,
        $5::double precision * power(2, least(
            CASE WHEN $7::boolean THEN attempts ELSE $8::integer END, 60))) / 1000.0),
    lease_expires_at = NULL,
    lease_token = NULL,
    last_error = $3
WHERE id = ANY($1::bigint[]) AND lease_token = $2 AND status = 'processing'
RETURNING id, status;

-- name: kill_claimed --
-- A payload that cannot be decoded goes dead at once, alone.
UPDATE ingestion_queue
SET attempts = attempts + 1, status = 'dead', lease_expires_at = NULL,
    lease_token = NULL, last_error = $3
WHERE id = ANY($1::bigint[]) AND lease_token = $2 AND status = 'processing';

-- name: release_claimed --
-- Shutdown: every row this process still has claimed goes back to pending at once,
-- attempts unchanged. By token, not by id, so a claim that committed while its query was
-- being cancelled (its rows never reached the buffer) is released too.
UPDATE ingestion_queue
SET status = 'pending', available_at = now(), lease_expires_at = NULL, lease_token = NULL
WHERE lease_token = $1 AND status = 'processing';

-- name: requeue_dead --
WITH picked AS (
    SELECT id FROM ingestion_queue
    WHERE status = 'dead' AND ($1::text IS NULL OR signal = $1)
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE ingestion_queue q
SET status = 'pending', attempts = 0, available_at = now(), last_error = NULL
FROM picked p WHERE q.id = p.id
RETURNING q.id;

-- name: dead_count --
SELECT count(*) FROM ingestion_queue WHERE status = 'dead';

-- name: manifest_keys_among --
-- gc-orphans: which of some keys a manifest row names, an OTLP object's or a Parquet
-- file's (parquet_files): any other object under S3_PREFIX is an orphan.
SELECT object_key FROM export_batches WHERE object_key = ANY($1::text[])
UNION ALL
SELECT object_key FROM parquet_files WHERE object_key = ANY($1::text[]);

-- name: archive_batches --
-- The archive commands' selection, one signal ($1) at a time so that the scan follows
-- export_batches_created_idx: rows whose data time range overlaps [$2, $3) (NULL: open),
-- that name the service $4 (NULL: any), of the tenant $8 (NULL: any), in (created_at,
-- batch_id) order after the page key ($5, $6), at most $7 of them. A row without a
-- tenant (stored before tenants) is $9's, DEFAULT_TENANT's: the filter means
-- coalesce(tenant, $9) = $8, spelt so that the planner estimates it from the column's
-- statistics (an expression has none, and a guess of 0.5% makes a seq scan and a sort
-- look cheaper than the index for every page); it filters the rows the index gives.
SELECT batch_id, signal, object_key, item_count, record_count, compressed_bytes, raw_bytes,
       min_time, max_time, service_names, created_at, coalesce(tenant, $9::text) AS tenant
FROM export_batches
WHERE signal = $1
  AND ($2::timestamptz IS NULL OR max_time >= $2)
  AND ($3::timestamptz IS NULL OR min_time < $3)
  AND ($4::text IS NULL OR $4 = ANY(service_names))
  AND ($8::text IS NULL OR tenant = $8 OR (tenant IS NULL AND $8 = $9::text))
  AND created_at >= $5
  AND (created_at > $5 OR batch_id > $6)
ORDER BY created_at, batch_id
LIMIT $7;

-- name: archive_totals --
-- Objects, records and stored bytes of the same selection (the first $5 rows of it), of
-- the tenant $6 (NULL: any; a row without one is $7's, DEFAULT_TENANT's).
SELECT count(*), coalesce(sum(record_count), 0)::bigint,
       coalesce(sum(compressed_bytes), 0)::bigint
FROM (
    SELECT record_count, compressed_bytes
    FROM export_batches
    WHERE signal = $1
      AND ($2::timestamptz IS NULL OR max_time >= $2)
      AND ($3::timestamptz IS NULL OR min_time < $3)
      AND ($4::text IS NULL OR $4 = ANY(service_names))
      AND ($6::text IS NULL OR tenant = $6 OR (tenant IS NULL AND $6 = $7::text))
    ORDER BY created_at, batch_id
    LIMIT $5
) selected;

-- name: archive_expire --
-- prune: delete up to $3 manifest rows of signal $1 stored before $2, of the tenant $4
-- (NULL: any; a row without one is $5's, DEFAULT_TENANT's), returning what their objects
-- were. Its own transaction: the objects go only after it has committed. A row that a
-- destination has not taken (a pending, processing or dead delivery) is kept, unless $6
-- (--force): then those deliveries go with it (the cascade), each counted lost for its
-- destination in delivery_losses, and returned as the row's `lost` destinations.
WITH doomed AS (
    SELECT batch_id FROM export_batches b
    WHERE signal = $1 AND created_at < $2
      AND ($4::text IS NULL OR tenant = $4 OR (tenant IS NULL AND $4 = $5::text))
      AND ($6::boolean OR NOT EXISTS (
          SELECT 1 FROM deliveries d
          WHERE d.batch_id = b.batch_id AND d.status <> 'delivered'))
      -- The Parquet copy in use (any file recorded): a row not compacted yet is kept too.
      AND ($6::boolean OR b.compacted_at IS NOT NULL
           OR NOT EXISTS (SELECT 1 FROM parquet_files))
    ORDER BY created_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), lost AS (
    INSERT INTO delivery_losses AS l (destination, objects, last_lost_at)
    SELECT destination, count(*), now() FROM deliveries
    WHERE batch_id IN (SELECT batch_id FROM doomed) AND status <> 'delivered'
    GROUP BY destination
    ON CONFLICT (destination) DO UPDATE
    SET objects = l.objects + excluded.objects, last_lost_at = excluded.last_lost_at
)
DELETE FROM export_batches e
WHERE batch_id IN (SELECT batch_id FROM doomed)
RETURNING object_key, compressed_bytes,
          ARRAY(SELECT destination FROM deliveries d
                WHERE d.batch_id = e.batch_id AND d.status <> 'delivered'
                ORDER BY destination) AS lost;

-- name: archive_expired_totals --
-- prune --dry-run: the rows (and their stored bytes) stored before $1, of the tenant $2
-- (NULL: any; a row without one is $3's, DEFAULT_TENANT's); without $4 (--force), not
-- those a destination has not taken yet.
SELECT count(*), coalesce(sum(compressed_bytes), 0)::bigint
FROM export_batches b
WHERE created_at < $1
  AND ($2::text IS NULL OR tenant = $2 OR (tenant IS NULL AND $2 = $3::text))
  AND ($4::boolean OR NOT EXISTS (
      SELECT 1 FROM deliveries d
      WHERE d.batch_id = b.batch_id AND d.status <> 'delivered'))
  AND ($4::boolean OR b.compacted_at IS NOT NULL
       OR NOT EXISTS (SELECT 1 FROM parquet_files));

-- name: archive_kept_uncompacted --
-- prune: manifest rows stored before $1 (of the tenant $2; NULL: any; a row without one
-- is $3's) not compacted yet while the Parquet copy is in use: kept, unless --force.
SELECT count(*)
FROM export_batches b
WHERE created_at < $1 AND compacted_at IS NULL
  AND ($2::text IS NULL OR tenant = $2 OR (tenant IS NULL AND $2 = $3::text))
  AND EXISTS (SELECT 1 FROM parquet_files);

-- name: vacuum_lock --
-- One process vacuums the queue at a time (a session lock: its connection is closed after).
SELECT pg_try_advisory_lock(hashtext('otelworker.vacuum'));

-- name: vacuum_queue --
-- Not FULL: no lock that blocks inserts, claims or deletes; rows and pages locked by a
-- claim are skipped, not waited for. Vacuums the table's TOAST too.
VACUUM (SKIP_LOCKED) ingestion_queue;

-- ---------------------------------------------------------------------------------------
-- Forwarding (otelworker/forwarding): deliveries of archived objects to destinations.
-- ---------------------------------------------------------------------------------------

-- name: delivery_claim --
-- Up to $2 of destination $1's deliveries that are due: pending whose next attempt has
-- come, or processing whose lease has expired (a crashed or stalled forwarder's), never
-- one this forwarder ($4) still holds ($5: the ids it is sending; one of its own whose
-- mark failed and which it no longer holds may be taken again); oldest due first. A
-- claimed row's next_attempt_at is its lease's end, so both kinds come from the one
-- partial index in order.
WITH due AS (
    SELECT id FROM deliveries
    WHERE destination = $1
      AND status IN ('pending', 'processing')
      AND next_attempt_at <= now()
      AND (status = 'pending'
           OR (lease_expires_at < now()
               AND (lease_token IS DISTINCT FROM $4::uuid OR id <> ALL($5::bigint[]))))
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d
SET status = 'processing',
    lease_token = $4,
    lease_expires_at = now() + make_interval(secs => $3),
    next_attempt_at = now() + make_interval(secs => $3)
FROM due
WHERE d.id = due.id
RETURNING d.id, d.destination, d.batch_id, d.object_key, d.signal, d.tenant, d.record_count,
          d.raw_bytes, d.compressed_bytes, d.attempts, d.created_at;

-- name: delivery_renew --
UPDATE deliveries
SET lease_expires_at = now() + make_interval(secs => $2),
    next_attempt_at = now() + make_interval(secs => $2)
WHERE id = ANY($1::bigint[]) AND lease_token = $3 AND status = 'processing';

-- name: delivery_delivered --
-- Taken by the destination; $3 of its records it rejected (partial success).
UPDATE deliveries
SET status = 'delivered', delivered_at = now(), last_attempt_at = now(),
    attempts = attempts + 1, rejected_records = $3, last_status = $4, last_error = NULL,
    lease_token = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND status = 'processing';

-- name: delivery_retry --
-- A retryable failure: pending again after $3 seconds. Never dead, however many attempts.
UPDATE deliveries
SET status = 'pending', attempts = attempts + 1, last_attempt_at = now(),
    next_attempt_at = now() + make_interval(secs => $3), last_status = $4, last_error = $5,
    lease_token = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND status = 'processing';

-- name: delivery_dead --
-- A permanent refusal (or the object is gone): parked until requeue-dead --destination.
UPDATE deliveries
SET status = 'dead', attempts = attempts + 1, last_attempt_at = now(), last_status = $3,
    last_error = $4, lease_token = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND status = 'processing';

-- name: delivery_release --
-- Shutdown: every delivery this forwarder still holds is pending again at once, attempts
-- unchanged (one cut off mid-send may then be sent twice: at-least-once).
UPDATE deliveries
SET status = 'pending', next_attempt_at = now(), lease_token = NULL, lease_expires_at = NULL
WHERE lease_token = $1 AND status = 'processing';

-- name: delivery_stats --
-- Per destination: deliveries not yet taken (pending, processing), the age in seconds of
-- the oldest of them, and the dead ones. Reads the two partial indexes' rows only.
WITH open AS (
    SELECT destination, count(*) AS pending,
           extract(epoch FROM now() - min(created_at))::float8 AS lag_s
    FROM deliveries WHERE status IN ('pending', 'processing')
    GROUP BY destination
), dead AS (
    SELECT destination, count(*) AS dead FROM deliveries WHERE status = 'dead'
    GROUP BY destination
)
SELECT coalesce(o.destination, d.destination) AS destination,
       coalesce(o.pending, 0)::bigint AS pending,
       coalesce(o.lag_s, 0)::float8 AS lag_s,
       coalesce(d.dead, 0)::bigint AS dead
FROM open o FULL JOIN dead d ON o.destination = d.destination;

-- name: delivery_losses --
SELECT destination, objects, last_lost_at FROM delivery_losses;

-- name: delivery_summary --
-- The destinations command: everything each destination has in the table.
SELECT destination,
       count(*) FILTER (WHERE status IN ('pending', 'processing'))::bigint AS pending,
       coalesce(sum(record_count) FILTER (WHERE status IN ('pending', 'processing')), 0)::bigint
           AS pending_records,
       coalesce(extract(epoch FROM now() - min(created_at)
                FILTER (WHERE status IN ('pending', 'processing'))), 0)::float8 AS oldest_s,
       count(*) FILTER (WHERE status = 'delivered')::bigint AS delivered,
       coalesce(sum(record_count - rejected_records) FILTER (WHERE status = 'delivered'), 0)
           ::bigint AS delivered_records,
       coalesce(sum(rejected_records) FILTER (WHERE status = 'delivered'), 0)::bigint
           AS rejected_records,
       count(*) FILTER (WHERE status = 'dead')::bigint AS dead,
       coalesce(sum(record_count) FILTER (WHERE status = 'dead'), 0)::bigint AS dead_records,
       max(delivered_at) AS last_delivered_at
FROM deliveries
GROUP BY destination;

-- name: delivery_last_errors --
-- The latest failure of each destination among the deliveries it has not taken.
SELECT DISTINCT ON (destination) destination, status, last_status, last_error, last_attempt_at
FROM deliveries
WHERE last_error IS NOT NULL AND status <> 'delivered'
ORDER BY destination, last_attempt_at DESC NULLS LAST;

-- name: redeliver --
-- Queue destination $1 for the manifest rows $2: a new delivery for an object it has none
-- of; a dead one pending again; a delivered one only with $3 (--again); a pending or
-- processing one is left as it is. The forwarders are woken at commit. A manifest row
-- without a tenant is $4's (DEFAULT_TENANT).
WITH queued AS (
    INSERT INTO deliveries (destination, batch_id, object_key, signal, tenant, record_count,
                            raw_bytes, compressed_bytes)
    SELECT $1, batch_id, object_key, signal, coalesce(tenant, $4), record_count, raw_bytes,
           compressed_bytes
    FROM export_batches
    WHERE batch_id = ANY($2::uuid[])
    ON CONFLICT (destination, batch_id) DO UPDATE
    SET status = 'pending', attempts = 0, next_attempt_at = now(), created_at = now(),
        lease_token = NULL, lease_expires_at = NULL, last_status = NULL, last_error = NULL,
        delivered_at = NULL, rejected_records = 0
    WHERE deliveries.status = 'dead' OR ($3 AND deliveries.status = 'delivered')
    RETURNING 1
)
SELECT count(*), pg_notify('otelworker_deliveries', $1) FROM queued;

-- name: redeliver_count --
-- redeliver --dry-run: how many of the manifest rows $2 it would queue for $1.
SELECT count(*)
FROM export_batches b
LEFT JOIN deliveries d ON d.batch_id = b.batch_id AND d.destination = $1
WHERE b.batch_id = ANY($2::uuid[])
  AND (d.id IS NULL OR d.status = 'dead' OR ($3 AND d.status = 'delivered'));

-- name: requeue_dead_deliveries --
WITH picked AS (
    SELECT id FROM deliveries
    WHERE destination = $1 AND status = 'dead'
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), requeued AS (
    UPDATE deliveries d
    SET status = 'pending', attempts = 0, next_attempt_at = now(), created_at = now(),
        last_error = NULL, last_status = NULL
    FROM picked p WHERE d.id = p.id
    RETURNING 1
)
SELECT count(*), pg_notify('otelworker_deliveries', $1) FROM requeued;

-- name: archive_kept_for_delivery --
-- prune: manifest rows stored before $1 (of the tenant $2; NULL: any; a row without one is
-- $3's) that a destination has not taken (pending, processing or dead), per destination.
-- The row with a NULL destination: the distinct objects in all.
SELECT d.destination, count(DISTINCT d.batch_id)::bigint AS objects
FROM deliveries d
JOIN export_batches b ON b.batch_id = d.batch_id
WHERE d.status <> 'delivered' AND b.created_at < $1
  AND ($2::text IS NULL OR b.tenant = $2 OR (b.tenant IS NULL AND $2 = $3::text))
GROUP BY GROUPING SETS ((d.destination), ())
ORDER BY d.destination NULLS FIRST;

-- name: replication_settings --
-- What decides whether a commit survives a failover (docs/design.md, "Durability across a
-- failover"). synchronous_commit as this session sees it (ALTER ROLE/DATABASE included);
-- the count of synchronous standbys only where this role may see pg_stat_replication's
-- details (superuser or pg_read_all_stats), else NULL. Aurora is told by its function,
-- RDS and Cloud SQL by their settings: their replication is below PostgreSQL's view.
SELECT current_setting('synchronous_commit') AS synchronous_commit,
       current_setting('synchronous_standby_names') AS synchronous_standby_names,
       pg_is_in_recovery() AS in_recovery,
       current_setting('transaction_read_only') = 'on' AS read_only,
       to_regproc('aurora_version') IS NOT NULL AS aurora,
       coalesce(current_setting('rds.extensions', true),
                current_setting('cloudsql.iam_authentication', true)) IS NOT NULL AS managed,
       CASE WHEN pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
            THEN (SELECT count(*) FROM pg_stat_replication
                  WHERE sync_state IN ('sync', 'quorum'))
       END AS sync_standbys;

-- name: listen_check --
-- A LISTEN connection's periodic question: an answer says the server is still there.
SELECT 1;

-- name: server_state --
-- Readiness: a standby or a read-only primary takes no writes; commits of this role
-- waiting for a synchronous standby (wait_event SyncRep) are committed locally but not
-- answered: traffic should go elsewhere while they wait. Where this role may see
-- pg_stat_replication's details, a server that names synchronous standbys and has none
-- in sync is told too: its every commit will wait.
SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' AS read_only,
       (SELECT count(*) FROM pg_stat_activity
        WHERE wait_event = 'SyncRep' AND datname = current_database()
          AND usename = current_user) AS sync_rep_waits,
       NOT pg_is_in_recovery()
         AND current_setting('synchronous_standby_names') <> ''
         AND current_setting('synchronous_commit') IN ('on', 'remote_apply', 'remote_write')
         AND pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
         AND NOT EXISTS (SELECT 1 FROM pg_stat_replication
                         WHERE sync_state IN ('sync', 'quorum')) AS sync_standby_missing;

-- name: compact_tenants --
-- The compactor: the tenants with manifest rows of signal $1 stored before $2 and not
-- compacted yet (a row without a tenant is $3's, DEFAULT_TENANT's).
SELECT DISTINCT coalesce(tenant, $3::text) AS tenant
FROM export_batches
WHERE signal = $1 AND compacted_at IS NULL AND created_at < $2;

-- name: compact_pending --
-- The compactor: up to $5 manifest rows of signal $1, tenant $3 (a row without one is
-- $4's), stored before $2 and not compacted yet, by arrival (export_batches_uncompacted_idx).
SELECT batch_id, object_key, record_count, raw_bytes, created_at
FROM export_batches
WHERE signal = $1 AND compacted_at IS NULL AND created_at < $2
  AND (tenant = $3 OR (tenant IS NULL AND $3 = $4::text))
ORDER BY created_at, batch_id
LIMIT $5;

-- name: compact_oldest_due --
-- The compactor's lag (otelworker_compact_lag_seconds): the arrival time of the oldest
-- manifest row of the signals $1 stored before $2 (what a pass takes) and not compacted
-- yet, of the tenant $3 (NULL: any; a row without one is $4's); NULL when none. One probe
-- of export_batches_uncompacted_idx per signal.
SELECT min(o.created_at)
FROM unnest($1::text[]) AS s(signal)
CROSS JOIN LATERAL (
    SELECT b.created_at
    FROM export_batches b
    WHERE b.signal = s.signal AND b.compacted_at IS NULL AND b.created_at < $2
      AND ($3::text IS NULL OR coalesce(b.tenant, $4::text) = $3)
    ORDER BY b.created_at
    LIMIT 1
) AS o;

-- name: compact_try_lock --
-- One compactor works on a (tenant, signal) at a time (a session lock on a connection
-- held for the pass; released by compact_unlock or when the connection goes).
SELECT pg_try_advisory_lock(hashtext('otelworker.compact'), hashtext($1 || '/' || $2));

-- name: compact_unlock --
SELECT pg_advisory_unlock(hashtext('otelworker.compact'), hashtext($1 || '/' || $2));

-- name: compact_mark --
-- The compactor's commit, first statement: mark the source rows compacted; fewer rows
-- than given means another compactor (or prune) took some: the transaction rolls back.
UPDATE export_batches SET compacted_at = now()
WHERE batch_id = ANY($1::uuid[]) AND compacted_at IS NULL;

-- name: parquet_file_insert --
-- The compactor's commit, second statement: one row per file written.
INSERT INTO parquet_files (file_id, tenant, table_name, object_key, row_count,
                           compressed_bytes, min_time, max_time, service_names,
                           source_batches, window_start, window_end, schema_version)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13);

-- name: parquet_expire --
-- prune --parquet: delete up to $3 parquet_files rows recorded before $1, of the tenant $2
-- (NULL: any), returning their keys; committed before the files are deleted.
WITH doomed AS (
    SELECT file_id FROM parquet_files
    WHERE created_at < $1 AND ($2::text IS NULL OR tenant = $2)
    ORDER BY created_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
DELETE FROM parquet_files
WHERE file_id IN (SELECT file_id FROM doomed)
RETURNING object_key, compressed_bytes;

-- name: parquet_expired_totals --
-- prune --parquet --dry-run: the files (and bytes) recorded before $1, of the tenant $2.
SELECT count(*), coalesce(sum(compressed_bytes), 0)::bigint
FROM parquet_files
WHERE created_at < $1 AND ($2::text IS NULL OR tenant = $2);
