"""otelworker: durable OTLP/HTTP ingestion into PostgreSQL-staged, S3-batched storage."""
