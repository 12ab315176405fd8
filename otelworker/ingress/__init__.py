"""Ingress: the OTLP/HTTP endpoints, body handling and admission control."""
