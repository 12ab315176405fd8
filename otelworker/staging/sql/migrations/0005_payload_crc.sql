-- A checksum of each stored payload, taken at the door when it is staged (CRC-32 of the
-- stored bytes, as gzip computes it): the flush checks a row whole with it instead of
-- decompressing the payload, so a row whose bytes changed after staging (a torn write,
-- a bug, a hand edit) still goes dead alone. NULL for rows staged before: their flush
-- decompresses them to check them, as before. A NULL column: no table rewrite.
ALTER TABLE ingestion_queue ADD COLUMN payload_crc bigint;
