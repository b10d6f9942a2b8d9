"""Mixed precision under an accuracy budget or a size target (``quantaudit autotune``), and plan files.

``add_autotune_arguments`` / ``run_autotune`` import no torch until the command runs; ``autotune``
and ``report_fragment`` load :mod:`quantaudit.tune.command` on first use.
"""

from .cli import add_autotune_arguments as add_autotune_arguments
from .cli import run_autotune as run_autotune
from .settings import AutotuneSettings as AutotuneSettings

_COMMAND_NAMES = {"autotune", "report_fragment"}
_PLAN_NAMES = {"effective_bits", "plan_units"}

__all__ = sorted({"AutotuneSettings", "add_autotune_arguments", "run_autotune", *_COMMAND_NAMES, *_PLAN_NAMES})


def __getattr__(name: str):
    if name in _COMMAND_NAMES:
        from . import command

        return getattr(command, name)
    if name in _PLAN_NAMES:
        from ..quant import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
