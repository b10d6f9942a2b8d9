import pytest

from quantaudit.errors import UserError
from quantaudit.measure.budget import GRAMMAR, check_budget, parse_budget


def test_parse_and_check():
    limits = parse_budget("kld<=0.02, ppl_ratio<=1.05,top1>=0.9")
    assert [str(l) for l in limits] == ["kld<=0.02", "ppl_ratio<=1.05", "top1>=0.9"]
    entry = {"kld": {"mean": 0.03, "p99": 0.2}, "ppl_ratio": 1.01, "top1": 0.95}
    assert check_budget(entry, limits) == ["kld 0.03 fails kld<=0.02"]
    entry["kld"]["mean"] = 0.02
    assert check_budget(entry, limits) == []


def test_unmeasured_metric_fails_the_budget():
    assert check_budget({"kld": {"mean": 0.0}}, parse_budget("recovery>=0.95")) == [
        "recovery not measured (needed for recovery>=0.95)"
    ]


@pytest.mark.parametrize("text", ["kld=0.02", "kld<=abc", "speed>=3", "", "kld<=0.02,,top1"])
def test_bad_budget_shows_the_grammar(text):
    with pytest.raises(UserError) as err:
        parse_budget(text)
    assert "budget grammar" in str(err.value) and "\n" not in str(err.value)
    assert GRAMMAR in str(err.value)

