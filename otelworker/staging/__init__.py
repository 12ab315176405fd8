"""Staging: the durable Postgres queue every acknowledged payload lands in first."""
