"""AuditSettings: what the audit flags turn into."""

from __future__ import annotations


def test_algorithm_flags_reach_every_candidates_spec():
    """--smoothquant-alpha, --act-order and --include-lm-head shape what is quantized (and are in the resume key)."""
    from quantaudit.audit.inputs import candidates
    from quantaudit.audit.settings import AuditSettings

    plain = AuditSettings(formats=["int8_sq", "int4_gptq"])
    tuned = AuditSettings(formats=["int8_sq", "int4_gptq"], smoothquant_alpha=0.8, act_order=False, gptq_scale="amax",
                          include_lm_head=True)
    specs = [c.spec for c in candidates(tuned, None)]
    assert [(s.smoothquant_alpha, s.gptq.act_order, s.gptq.scale_search, s.include_lm_head) for s in specs] == [
        (0.8, False, "amax", True)] * 2
    assert [(c.spec.gptq.act_order, c.spec.gptq.scale_search) for c in candidates(plain, None)] == [(True, "mse")] * 2
    assert plain.fingerprint() != tuned.fingerprint()
