"""Processing: claim staged payloads, buffer them, batch them and hand them to a sink."""
