"""The `--abort-if` expression of a staged rollout: a tiny safe parser, no `eval`.

    rule := or_expr
    or_expr  := and_expr ("or" and_expr)*
    and_expr := atom ("and" atom)*
    atom     := METRIC OP NUMBER | "(" or_expr ")"
    OP       := ">" | ">=" | "<" | "<=" | "==" | "!="
    NUMBER   := 0.02 | 800 | 2% (= 0.02) | 1e-3

    AbortRule.parse("error_rate>0.02 or ttft_p95_ms>800 or quality_drop>5%")

Metric names are checked against `METRICS` when the rule is parsed, so a typo fails the
`deploy` command at once instead of never tripping. A malformed expression raises
`AbortRuleError` naming the offending token and its column. `evaluate` returns whether the
rule trips and, when it does, the comparisons that made it trip with the measured numbers
(the reason recorded on an aborted rollout). A metric the rule needs but the phase could not
measure is reported as missing rather than guessed: the controller treats that as a trip.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge_runtime.errors import AbortRuleError

METRICS: dict[str, str] = {
    "error_rate": "share of failed requests on the device (0..1)",
    "ttft_p95_ms": "p95 time to first token, ms",
    "p95_latency_ms": "p95 request latency, ms",
    "tokens_per_s": "decode tokens/s",
    "offload_share": "share of requests offloaded to the cloud (0..1)",
    "queue_depth": "requests waiting in the scheduler queue",
    "quality": "the quality probe's score of the new bundle (0..1)",
    "quality_drop": "the quality probe's drop vs the bundle's build record, as devices "
                    "report it; else the group's `quality` on the old bundle minus the "
                    "phase's on the new one",
    "failure_rate": "share of the phase's devices whose deploy failed or timed out",
}
"""What a rule may name; the controller computes each as the phase's mean over devices."""

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne,
}
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?%?|\.\d+(?:[eE][-+]?\d+)?%?)"
                    r"|(?P<op>>=|<=|==|!=|>|<)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                    r"|(?P<paren>[()]))")


@dataclass(frozen=True)
class Comparison:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class Node:
    """`kind` is "or" / "and" over `children`, or "cmp" holding `cmp`."""

    kind: str
    children: tuple[Node, ...] = ()
    cmp: Comparison | None = None


@dataclass(frozen=True)
class Verdict:
    tripped: bool
    reason: str
    """The comparisons that hold, with measured values: `error_rate=0.031>0.02`."""
    missing: tuple[str, ...] = ()
    """Metrics the rule names that were not measured (the rule could not be decided)."""
    held: tuple[Comparison, ...] = ()


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | op | name | paren | end
    text: str
    column: int


def _tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            col = pos + len(text[pos:]) - len(text[pos:].lstrip()) + 1
            bad = re.match(r"\w+|[^\w\s]+", text[col - 1:]).group()  # type: ignore[union-attr]
            raise AbortRuleError(f"abort rule: unexpected {bad!r} at column {col} of {text!r}",
                                 bad, col)
        kind = next(k for k, v in m.groupdict().items() if v is not None)
        out.append(_Tok(kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, tok: _Tok, want: str) -> AbortRuleError:
        shown = tok.text or "end of expression"
        return AbortRuleError(f"abort rule: expected {want}, got {shown!r} at column "
                              f"{tok.column} of {self.text!r}", tok.text, tok.column)

    def parse(self) -> Node:
        node = self.or_expr()
        if self.peek().kind != "end":
            raise self.fail(self.peek(), "'or', 'and' or the end")
        return node

    def or_expr(self) -> Node:
        parts = [self.and_expr()]
        while self.peek().kind == "name" and self.peek().text == "or":
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else Node("or", tuple(parts))

    def and_expr(self) -> Node:
        parts = [self.atom()]
        while self.peek().kind == "name" and self.peek().text == "and":
            self.take()
            parts.append(self.atom())
        return parts[0] if len(parts) == 1 else Node("and", tuple(parts))

    def atom(self) -> Node:
        t = self.take()
        if t.kind == "paren" and t.text == "(":
            node = self.or_expr()
            close = self.take()
            if close.kind != "paren" or close.text != ")":
                raise self.fail(close, "')'")
            return node
        if t.kind != "name" or t.text in ("or", "and"):
            raise self.fail(t, "a metric name or '('")
        if t.text not in METRICS:
            raise AbortRuleError(f"abort rule: unknown metric {t.text!r} at column {t.column} "
                                 f"of {self.text!r} (known: {', '.join(METRICS)})",
                                 t.text, t.column)
        op = self.take()
        if op.kind != "op":
            raise self.fail(op, "a comparison (> >= < <= == !=)")
        num = self.take()
        if num.kind != "num":
            raise self.fail(num, "a number")
        value = float(num.text.rstrip("%")) / (100.0 if num.text.endswith("%") else 1.0)
        return Node("cmp", cmp=Comparison(t.text, op.text, value))


@dataclass(frozen=True)
class AbortRule:
    text: str
    root: Node

    @classmethod
    def parse(cls, text: str) -> AbortRule:
        if not text.strip():
            raise AbortRuleError("abort rule is empty", "", 1)
        return cls(text.strip(), _Parser(text.strip()).parse())

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset(c.metric for c in _comparisons(self.root))

    def evaluate(self, values: Mapping[str, float]) -> Verdict:
        missing = tuple(sorted(m for m in self.metrics if m not in values))
        if missing:
            return Verdict(False, "", missing)
        tripped, held = _eval(self.root, values)
        if not tripped:
            return Verdict(False, "")
        return Verdict(True, ", ".join(
            f"{c.metric}={values[c.metric]:.4g}{c.op}{c.threshold:g}" for c in held),
            held=tuple(held))


def _comparisons(node: Node) -> list[Comparison]:
    if node.cmp is not None:
        return [node.cmp]
    return [c for child in node.children for c in _comparisons(child)]


def _eval(node: Node, values: Mapping[str, float]) -> tuple[bool, list[Comparison]]:
    """Whether `node` holds, and the comparisons that make it hold (for the reason)."""
    if node.cmp is not None:
        c = node.cmp
        ok = _OPS[c.op](values[c.metric], c.threshold)
        return ok, [c] if ok else []
    results = [_eval(child, values) for child in node.children]
    if node.kind == "and":
        ok = all(r for r, _ in results)
        return ok, [c for _, cs in results for c in cs] if ok else []
    held = [c for r, cs in results if r for c in cs]
    return bool(held), held
