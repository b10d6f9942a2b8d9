"""Quantization engine: formats as data, numerics, calibration, and ``quantize()``.

``from quantaudit.quant import quantize, QuantSpec`` loads the engine on first use, so importing
``quantaudit.quant.formats`` stays light (no transformers import).
"""

_ENGINE_NAMES = {"quantize", "QuantSpec", "QuantizedModel", "LayerRecord", "KVScales", "GPTQOptions", "AWQOptions"}

__all__ = sorted(_ENGINE_NAMES)


def __getattr__(name: str):
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
