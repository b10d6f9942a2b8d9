"""Layer streaming: audit models far larger than memory, one decoder layer at a time (issue #9).

:mod:`.source` reads the checkpoint part by part from its safetensors files, :mod:`.spill` keeps the
hidden states at the current layer boundary (in memory up to a budget, on disk beyond), and
:mod:`.audit` runs the baseline and every candidate format through the layers as they stream past.
"""
