"""Forwarding: every archived object delivered to each OTLP destination that wants it."""
