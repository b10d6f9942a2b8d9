"""``quantaudit advise``: which format, KV cache and serving setup for a model on a GPU and workload.

hardware (GPU table as data) -> model_shape (config only) -> planner (memory) -> roofline (speed)
-> recommend (ordered rules) -> deployment (batching, speculative decoding, model size) -> advisor.advise().
"""

from .advisor import advise
from .command import DESCRIPTION, HELP, add_advise_arguments, run_advise
from .planner import PlannerSettings
from .recommend import Workload
from .roofline import Efficiency

__all__ = ["advise", "add_advise_arguments", "run_advise", "HELP", "DESCRIPTION", "Workload", "Efficiency",
           "PlannerSettings"]
