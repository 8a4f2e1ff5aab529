"""`-k` expressions, pytest's grammar, parsed once for `cxr-bench run -k` and `pytest benchmarks -k`.

    expression := [expr]          expr := and ("or" and)*          and := not ("and" not)*
    not        := "not" not | "(" expr ")" | word        word := letters, digits and _ . - [ ] : + / \\

What a word means is the caller's: `compile(text)` returns a function of a word matcher. Chains of
`not` are folded without recursion, and parentheses may nest MAX_DEPTH deep, so no expression can
exhaust the stack or memory; one longer than MAX_LENGTH is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cxr.errors import CxrError

MAX_LENGTH = 10_000
MAX_DEPTH = 100
_TOKEN = re.compile(r"\s*(?:(\()|(\))|([\w.\-\[\]:+/\\]+)|(\S))")

Matcher = Callable[[str], bool]


class KeywordError(CxrError):
    """A -k expression that cannot be parsed."""


def compile(text: str) -> Callable[[Matcher], bool]:  # noqa: A001 (the name pytest uses too)
    """Parse `text`; the result evaluates it with a word matcher. Raises KeywordError."""
    if len(text) > MAX_LENGTH:
        raise KeywordError(f"-k: expression of {len(text)} characters; at most {MAX_LENGTH}")
    tokens = _tokens(text)
    pos = 0

    def fail(why: str):
        raise KeywordError(f"-k {text[:80]!r}: {why}")

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def chain(op: str, operand, combine):  # operand (op operand)*, combined with any (or) / all (and)
        nonlocal pos
        terms = [operand()]
        while peek() == op:
            pos += 1
            terms.append(operand())
        return terms[0] if len(terms) == 1 else lambda m: combine(t(m) for t in terms)

    def expr(depth: int):
        return chain("or", lambda: chain("and", lambda: not_(depth), all), any)

    def not_(depth: int):
        nonlocal pos
        negations = 0
        while peek() == "not":
            pos, negations = pos + 1, negations + 1
        tok = peek()
        if tok == "(":
            if depth >= MAX_DEPTH:
                fail(f"parentheses nested more than {MAX_DEPTH} deep")
            pos += 1
            inner = expr(depth + 1)
            if peek() != ")":
                fail("expected ')'")
            pos += 1
        elif tok is None or tok in (")", "and", "or") or not isinstance(tok, tuple):
            fail(f"expected a word, 'not' or '(' {'at the end' if tok is None else f'at {tok!r}'}")
        else:
            pos += 1
            word = tok[1]
            inner = lambda m: m(word)  # noqa: E731
        if negations % 2:
            return lambda m: not inner(m)
        return inner

    if not tokens:
        return lambda m: True
    tree = expr(0)
    if pos != len(tokens):
        fail(f"unexpected {tokens[pos] if isinstance(tokens[pos], str) else tokens[pos][1]!r}")
    return tree


def _tokens(text: str) -> list:
    """'(' / ')' / 'and' / 'or' / 'not' as strings; words as ("word", text)."""
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        pos = m.end()
        lpar, rpar, word, other = m.groups()
        if other:
            raise KeywordError(f"-k {text[:80]!r}: unexpected character {other!r}")
        if lpar or rpar:
            out.append(lpar or rpar)
        elif word in ("and", "or", "not"):
            out.append(word)
        else:
            out.append(("word", word))
    return out
