"""Comparing two report.json files field by field: timings, timestamps and temporary paths left out, numbers to
float rounding (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import math

TIMING_KEYS = ("seconds", "_per_s", "created", "quantaudit_version", "torch_threads", "timings")


def normal(value, places: dict[str, str], drop: tuple[str, ...] = ()):
    """``value`` without timings (and the keys in ``drop``), each path in ``places`` written as its placeholder
    (``{str(tmp_path): "<tmp>"}``), so that reports from different folders or machines compare."""
    if isinstance(value, dict):
        return {_placed(k, places): normal(v, places, drop) for k, v in value.items()
                if not any(t in k for t in TIMING_KEYS) and k not in drop}
    if isinstance(value, list):
        return [normal(v, places, drop) for v in value]
    if isinstance(value, str):
        return _placed(value, places)
    return value


def _placed(text: str, places: dict[str, str]) -> str:
    for path, placeholder in places.items():
        text = text.replace(path, placeholder)
    return text


def differences(got, want, path="report", rel: float = 1e-5) -> list[str]:
    """Every place where ``got`` differs from ``want`` (floats: beyond ``rel`` relative, 1e-7 absolute)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}: keys {sorted(set(got) ^ set(want))} differ"] if set(got) != set(want) else []
        for key in set(got) & set(want):
            out += differences(got[key], want[key], f"{path}.{key}", rel)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, recorded {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{path}[{i}]", rel)]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        close = math.isclose(got, want, rel_tol=rel, abs_tol=1e-7) or (math.isnan(got) and math.isnan(want))
        return [] if close else [f"{path}: {got!r}, recorded {want!r}"]
    return [] if got == want else [f"{path}: {got!r}, recorded {want!r}"]
