"""Layer streaming's parts: read a checkpoint far larger than memory one decoder layer at a time (issue #9).

:mod:`.source` reads the checkpoint part by part from its safetensors files, and :mod:`.spill` keeps the
hidden states at the current layer boundary (in memory up to a budget, on disk beyond). The streamed audit
executor that runs the baseline and every candidate through the layers is :mod:`quantaudit.audit.streamed`.
"""
