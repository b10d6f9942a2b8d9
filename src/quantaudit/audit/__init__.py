"""``quantaudit audit``: its settings, the orchestrator (:mod:`.run`), the typed measurement (:mod:`.measurement`)
and the two executors (:mod:`.in_memory`, :mod:`.streamed`)."""
