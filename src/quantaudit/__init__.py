"""quantaudit: quantize a causal LM to every TensorRT-LLM format, audit each against the
full-precision baseline on identical tokens, recommend, and export what was audited."""

__version__ = "0.1.0"
