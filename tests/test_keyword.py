"""`-k` expressions (cxr.keyword): pytest's grammar, one parser for `cxr-bench run -k` and `pytest
benchmarks -k`, with no eval and bounded work on hostile input."""

import pytest
from _pytest.mark.expression import Expression  # pytest's own parser: the reference
from hypothesis import given
from hypothesis import strategies as st

from cxr import keyword

WORDS = ("a", "b", "lr0.1", "bs32-seed0", "x[1]")


@pytest.mark.parametrize("text", ["a", "not a", "a and b", "a or b", "not (a or b) and lr0.1", "not not a",
                                  "(((a)))", "a and not b or lr0.1", "bs32-seed0 or x[1]"])
def test_agrees_with_pytest_on_every_assignment(text):
    ours, theirs = keyword.compile(text), Expression.compile(text)
    for mask in range(2 ** len(WORDS)):
        true = {w for i, w in enumerate(WORDS) if mask >> i & 1}
        assert ours(true.__contains__) == theirs.evaluate(lambda w, _true=true, **kw: w in _true), (text, true)


_atom = st.sampled_from(WORDS)
_expr = st.recursive(_atom, lambda e: st.one_of(
    e.map(lambda x: f"not {x}"), st.tuples(e, e).map(lambda t: f"({t[0]} and {t[1]})"),
    st.tuples(e, e).map(lambda t: f"{t[0]} or {t[1]}")), max_leaves=8)


@given(_expr, st.sets(st.sampled_from(WORDS)))
def test_random_expressions_agree_with_pytest(text, true):
    assert keyword.compile(text)(lambda w: w in true) == Expression.compile(text).evaluate(lambda w, **kw: w in true)


@pytest.mark.parametrize(("text", "fragment"), [
    ("a and", "at the end"), ("(a", "expected ')'"), ("a b", "unexpected 'b'"), ("and", "at 'and'"),
    ("a $", "unexpected character '$'"), ("(" * 101 + "a" + ")" * 101, "nested more than 100 deep"),
    ("a " * 6000, "at most 10000"),
])
def test_bad_expressions_get_one_line(text, fragment):
    with pytest.raises(keyword.KeywordError) as e:
        keyword.compile(text)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_empty_expression_selects_everything():  # pytest skips an empty -k; so do we, by selecting all
    assert keyword.compile("")(lambda w: False) is True and keyword.compile("   ")(lambda w: False) is True


def test_long_not_chains_need_no_recursion():
    assert keyword.compile("not " * 2001 + "a")(lambda w: True) is False
    assert keyword.compile("not " * 2000 + "a")(lambda w: True) is True
