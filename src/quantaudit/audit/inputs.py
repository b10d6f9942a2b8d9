"""What an audit reads, read and checked before ``--out`` is touched: the session (model and texts), the tasks, the
candidates and the ``--generate`` prompts. The orchestrator reads them once; a distributed job's worker reads them
again from the same settings (:mod:`.distributed`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..errors import UserError
from ..fidelity import PromptSet, prompt_set
from ..quant.formats import get_format
from ..quant.plan import check_fused_plan, load_plan
from ..session import Session, open_session
from ..tasks import check_tasks_bos
from .measurement import Candidate
from .settings import AuditSettings


def candidates(settings: AuditSettings, model) -> list[Candidate]:
    """The uniform ``--formats``, then the ``--plan`` (TensorRT-LLM ``MIXED_PRECISION``) if given."""
    out = [Candidate(name, settings.quant_spec(name), get_format(name).description, get_format(name).trtllm_quant_algo)
           for name in settings.formats]
    if settings.plan:
        plan = load_plan(settings.plan, model)
        check_fused_plan(plan.layers, plan.default, model, f"plan file {settings.plan}")
        counts = Counter(plan.layers.values())
        mix = ", ".join(f"{n} x {fmt}" for fmt, n in counts.most_common())
        out.append(Candidate("plan", settings.quant_spec(plan.default, plan.layers),
                             f"mixed precision from {settings.plan}: {mix}; other layers {plan.default}",
                             "MIXED_PRECISION"))
    return out


@dataclass
class Inputs:
    """What the audit reads, loaded and checked before ``--out`` is touched: the session (model and texts), the
    tasks, the candidates and the ``--generate`` prompts."""

    session: Session
    tasks: list
    candidates: list[Candidate]
    prompts: PromptSet | None = None


def check_inputs(settings: AuditSettings, streamed: bool) -> Inputs:
    """Read and check every input the flags name (tasks, model, texts, plan, prompts): a bad one fails here, before
    anything is written, and what was read is what the audit then uses."""
    tasks = settings.load_tasks()
    session = open_session(settings, streamed)
    check_tasks_bos(tasks, session.tokenizer, settings.bos)
    prompts = None
    if settings.generate:
        if streamed:
            raise UserError("--generate needs the whole model in memory, but this model is audited layer by layer "
                            "(--streaming auto found too little memory); drop --generate or free memory")
        prompts = prompt_set(settings.generate, session.tokenizer, settings.chat_template, settings.max_new_tokens)
    found = candidates(settings, session.model)
    for candidate in found:
        session.check_spec(candidate.spec)
    return Inputs(session, tasks, found, prompts)
