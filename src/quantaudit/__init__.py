"""quantaudit: quantize a causal LM to every TensorRT-LLM format, audit each against the
full-precision baseline on identical tokens, recommend, and export what was audited.

Code map, one stage of the data path per line, each layer importing only from those below it
(the import-linter contract in pyproject.toml, checked by ``make test``):

- ``cli``: flags in, tables out, exit codes; one line per error.
- commands: ``audit`` (orchestrator ``audit.run``, executors ``audit.in_memory`` and ``audit.streamed``,
  typed results ``audit.measurement``), ``tune`` (autotune), ``calibcheck``, ``export``, then ``advise``.
- ``report``: report.json rendered as terminal tables, Markdown and HTML with plots.
- ``session``: every shared flag declared once, ``quant_spec`` (the only QuantSpec builder), ``open_session``.
- ``measure`` (drift, sensitivity, outliers, budget), ``fidelity`` (generation), ``tasks`` (task accuracy).
- ``quant`` (formats as data, algorithms, ``quantize``), ``evaluate`` / ``baseline`` / ``metrics`` / ``logits``
  (paired statistics on identical tokens), ``stream`` (checkpoint parts, spill store).
- ``models`` / ``data`` (loading, token windows), ``arch`` (the architecture table), ``moe``, then utilities.
"""

__version__ = "0.1.0"
