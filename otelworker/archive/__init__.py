"""Reading the archive back: list (``batches``), ``replay``, ``prune`` and ``gc-orphans``.

The commands share one way of selecting manifest rows (:mod:`.selection`,
:mod:`.manifest`) and of reading objects (:mod:`.reader`).
"""
