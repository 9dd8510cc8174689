"""Symbolic answer grading with bounded work: extract an answer, parse it, compare with sympy.

Completions are untrusted text, so nothing here calls `eval` or sympy's `parse_expr`: a small
recursive-descent parser accepts numbers, + - * / ^, parentheses, sqrt, pi and single-letter
variables, and refuses anything whose evaluation could blow up (long inputs, deep nesting,
powers with large or non-rational exponents, results with too many digits). It does not know
about tuples, intervals, sets or units; those compare as normalised strings only.
"""

from __future__ import annotations

import math
import re

MAX_ANSWER_CHARS = 256
MAX_DEPTH = 32
MAX_RESULT_DIGITS = 10_000
MAX_SYMBOLIC_EXPONENT = 20
MAX_IRRATIONAL_EXPONENT = 100


class UnsupportedAnswer(ValueError):
    """The text is not an expression this grader will evaluate."""


# ---------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} whose braces balance, or None. One pass over the text
    (a completion is untrusted and long: scanning to the end from each `\boxed` was quadratic)."""
    closing = _matching_braces(text)
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{" and i in closing:
            return text[i + 1 : closing[i]]
        start = text.rfind("\\boxed", 0, start)
    return None


_BRACE = re.compile(r"[{}]")


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each balanced "{" -> position of its "}"; unmatched braces are left out."""
    closing, open_at = {}, []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            open_at.append(m.start())
        elif open_at:
            closing[open_at.pop()] = m.start()
    return closing


_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    r"""The answer a completion gives: the last \boxed{}, else what follows the last "answer is"
    or the last "=" on the last non-empty line, else that line itself."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[-1]
    found = list(_ANSWER_IS.finditer(line))
    if found:
        line = line[found[-1].end() :]
    elif "=" in line:
        line = line.rsplit("=", 1)[1]
    return line.strip().rstrip(".").strip() or None


# ---------------------------------------------------------------- normalisation

_DROP = [r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", r"\%", "%"]
_REPLACE = {r"\dfrac": r"\frac", r"\tfrac": r"\frac", r"\cdot": "*", r"\times": "*", r"\pi": "pi"}
_TEXT_CMD = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")


def _group(s: str, i: int) -> tuple[str, int]:
    """One LaTeX argument at s[i]: a {balanced group} or a single character."""
    if i >= len(s):
        raise UnsupportedAnswer("missing argument")
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise UnsupportedAnswer("unbalanced braces")


def _latex_to_plain(s: str, depth: int = 0) -> str:
    r"""\frac{a}{b} -> ((a)/(b)), \sqrt{a} -> sqrt(a), \sqrt[n]{a} -> ((a)^(1/(n))); braces -> ()."""
    if depth > MAX_DEPTH:
        raise UnsupportedAnswer("nested too deeply")
    out, i = [], 0
    while i < len(s):
        if s.startswith(r"\frac", i):
            num, i = _group(s, i + 5)
            den, i = _group(s, i)
            out.append(f"(({_latex_to_plain(num, depth + 1)})/({_latex_to_plain(den, depth + 1)}))")
        elif s.startswith(r"\sqrt", i):
            i += 5
            index = None
            if i < len(s) and s[i] == "[":
                close = s.find("]", i)
                if close == -1:
                    raise UnsupportedAnswer("unclosed root index")
                index, i = s[i + 1 : close], close + 1
            arg, i = _group(s, i)
            arg = _latex_to_plain(arg, depth + 1)
            out.append(f"sqrt({arg})" if index is None else f"(({arg})^(1/({index})))")
        else:
            out.append({"{": "(", "}": ")"}.get(s[i], s[i]))
            i += 1
    return "".join(out)


def normalize(answer: str) -> str:
    """Plain-text form of a (possibly LaTeX) answer; raises UnsupportedAnswer when too long."""
    if len(answer) > MAX_ANSWER_CHARS:
        raise UnsupportedAnswer(f"answer longer than {MAX_ANSWER_CHARS} characters")
    s = _TEXT_CMD.sub("", answer)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    for d in _DROP:
        s = s.replace(d, "")
    for old, new in _REPLACE.items():
        s = s.replace(old, new)
    s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    return _latex_to_plain(s).replace("**", "^").strip()


# ---------------------------------------------------------------- parsing

_NUMBER = re.compile(r"\d+\.?\d*|\.\d+")
_TOKEN = re.compile(rf"\s*(?:({_NUMBER.pattern})|([A-Za-z]+)|(.))")


def _tokens(s: str) -> list[str]:
    out = []
    for number, name, sym in _TOKEN.findall(s):
        tok = number or name or sym
        if name and name not in ("sqrt", "pi") and len(name) > 1:
            out.extend(name)  # "xy" is x*y, as in written maths
        elif tok.strip():
            out.append(tok)
    return out


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/'|implicit) unary)* ;
    unary := ('+'|'-') unary | power ; power := atom ('^' unary)? ;
    atom := number | pi | letter | sqrt '(' expr ')' | '(' expr ')'"""

    def __init__(self, text: str):
        import sympy

        self.sp = sympy
        self.toks = _tokens(text)
        self.pos = 0
        self.depth = 0

    def parse(self):
        if not self.toks:
            raise UnsupportedAnswer("empty answer")
        value = self.expr()
        if self.pos != len(self.toks):
            raise UnsupportedAnswer(f"unexpected {self.toks[self.pos]!r}")
        return value

    def peek(self) -> str | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise UnsupportedAnswer(f"expected {expected or 'more input'}, got {tok!r}")
        self.pos += 1
        return tok

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise UnsupportedAnswer("nested too deeply")
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        self.depth -= 1
        return value

    def term(self):
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/"):
                self.take()
                rhs = self.unary()
                if tok == "/" and rhs == 0:
                    raise UnsupportedAnswer("division by zero")
                value = value * rhs if tok == "*" else value / rhs
            elif tok is not None and (tok == "(" or tok[0].isalnum() or tok[0] == "."):
                value = value * self.unary()  # implicit product: 2x, 2sqrt(3), 3(4)
            else:
                return value

    def unary(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise UnsupportedAnswer("nested too deeply")
        tok = self.peek()
        if tok in ("+", "-"):
            self.take()
            value = self.unary()
            value = -value if tok == "-" else value
        else:
            value = self.power()
        self.depth -= 1
        return value

    def power(self):
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        return _bounded_pow(self.sp, base, self.unary())

    def atom(self):
        tok = self.take()
        if tok == "(":
            value = self.expr()
            self.take(")")
            return value
        if tok == "sqrt":
            self.take("(")
            value = self.expr()
            self.take(")")
            return self.sp.sqrt(value)
        if tok == "pi":
            return self.sp.pi
        if _NUMBER.fullmatch(tok):
            return self.sp.Rational(tok)  # exact: "0.5" equals "1/2"
        if len(tok) == 1 and tok.isalpha():
            return self.sp.Symbol(tok)
        raise UnsupportedAnswer(f"unexpected {tok!r}")


def _bounded_pow(sp, base, exponent):
    """base**exponent, refused when the result could be huge or slow to simplify."""
    if not exponent.is_Rational:
        raise UnsupportedAnswer("only rational exponents are graded")
    if base.is_Rational:
        magnitude = max(abs(base.p), abs(base.q), 2)
        if math.log10(magnitude) * abs(float(exponent)) > MAX_RESULT_DIGITS:
            raise UnsupportedAnswer("power too large")
    elif base.free_symbols:
        if abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise UnsupportedAnswer("symbolic power too large")
    elif abs(exponent) > MAX_IRRATIONAL_EXPONENT:
        raise UnsupportedAnswer("power too large")
    if base == 0 and exponent < 0:
        raise UnsupportedAnswer("division by zero")
    return base**exponent


def parse_answer(text: str):
    """Sympy expression of an answer text; raises UnsupportedAnswer for anything else."""
    return _Parser(normalize(text)).parse()


# ---------------------------------------------------------------- equivalence


def equivalent(given: str, reference: str) -> bool:
    """True when the two answers are equal as exact rationals, as numbers within a relative 1e-9,
    or as expressions agreeing at fixed sample points (or, failing parsing, as normalised strings)."""
    try:
        a, b = parse_answer(given), parse_answer(reference)
    except UnsupportedAnswer:
        try:
            return normalize(given).replace(" ", "") == normalize(reference).replace(" ", "")
        except UnsupportedAnswer:
            return False
    if a.is_Rational and b.is_Rational:
        return a == b
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    # Expressions in variables compare at fixed sample points rather than by simplify(a - b):
    # evaluation never expands (x+y+z)^20*(a+b+c)^20, simplify can take minutes on it.
    points = [dict(zip(symbols, values, strict=False)) for values in _SAMPLE_POINTS] if symbols else [{}]
    return all(_close(a, b, point) for point in points)


# Deterministic (node and coordinator must agree), irrational-looking, away from small integers.
_SAMPLE_POINTS = [
    [0.5377, 1.8339, -2.2588, 0.8622, 0.3188, -1.3077, -0.4336, 0.3426, 3.5784, 2.7694],
    [-1.3499, 3.0349, 0.7254, -0.0631, 0.7147, -0.2050, -0.1241, 1.4897, 1.4090, 1.4172],
    [0.6715, -1.2075, 0.7172, 1.6302, 0.4889, 1.0347, 0.7269, -0.3034, 0.2939, -0.7873],
]


def _close(a, b, point: dict) -> bool:
    diff, ref = (a - b).evalf(30, subs=point), b.evalf(30, subs=point)
    if diff.is_finite is not True or ref.is_finite is not True:  # e.g. a hidden 1/0
        return False
    if diff.free_symbols or ref.free_symbols:  # more variables than sample coordinates
        return False
    return abs(complex(diff)) <= 1e-9 * max(1.0, abs(complex(ref)))
