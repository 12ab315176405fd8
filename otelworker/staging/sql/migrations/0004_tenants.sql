-- Tenants: whose data each staged row and each object is. NULL means DEFAULT_TENANT (the
-- setting, resolved when read): rows and objects from before this migration belong to
-- it, and their objects keep the key they were stored under (without the tenant). No
-- default and NULL columns: no table rewrite.
ALTER TABLE ingestion_queue ADD COLUMN tenant text;
ALTER TABLE export_batches ADD COLUMN tenant text;
