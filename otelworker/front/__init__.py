"""The HTTP front of ``python -m otelworker serve``: uvicorn (httptools, uvloop) run inside
the service's own event loop (:mod:`.server`), its protocol guarded against slow and idle
clients (:mod:`.protocol`); and what only the bare ``hypercorn otelworker.app:app`` entry
needs (:mod:`.hypercorn`)."""
