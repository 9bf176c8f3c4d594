"""Tools a delegated query can go to: a calculator, a clock, and any callable a user registers.

A tool is a name, a function from the query to the answer's text, and a test of whether it
takes a query. A query names its tool explicitly with a prefix (`calculator: 17 * 3`), or goes
to the first registered tool that takes it; a query no tool takes goes to the background model
(`worker.py`). Answers are one short sentence the interaction model can say out loud.
"""

import ast
import datetime
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from microturn.errors import MicroturnError


@dataclass(frozen=True)
class Tool:
    name: str
    run: Callable[[str], str]
    takes: Callable[[str], bool] = lambda query: False  # auto-routing; a prefix always works

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", self.name):
            raise MicroturnError(f"tool name: lower-case letters, digits and _, starting with "
                                 f"a letter, at most 32 characters; got {self.name!r}")


class Tools:
    """The registered tools, in routing order."""

    def __init__(self, tools: list[Tool] | None = None):
        self._tools: dict[str, Tool] = {}
        for tool in tools if tools is not None else [CALCULATOR, CLOCK]:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise MicroturnError(f"tool name: {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def route(self, query: str) -> tuple[Tool | None, str]:
        """(the tool for `query`, the query it gets); (None, query) when no tool takes it."""
        name, colon, rest = query.partition(":")
        if colon and name.strip().lower() in self._tools:
            return self._tools[name.strip().lower()], rest.strip()
        return next((t for t in self._tools.values() if t.takes(query)), None), query


# -- the calculator ---------------------------------------------------------------------------

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod}
_WORDS = [  # spoken arithmetic -> symbols, longest phrases first
    (r"\bmultiplied by\b", "*"), (r"\bdivided by\b", "/"), (r"\bto the power of\b", "**"),
    (r"\badded to\b", "+"), (r"\btake away\b", "-"),
    (r"\bmultiplied\b", "*"), (r"\bdivided\b", "/"), (r"\badded\b", "+"),  # "by" left out
    (r"\btimes\b", "*"), (r"\bplus\b", "+"), (r"\bminus\b", "-"), (r"\bover\b", "/"),
    (r"\bmodulo\b|\bmod\b", "%"), (r"(?<=\d)\s*[x×]\s*(?=\d)", "*"), (r"÷", "/"),
    (r"\bsquared\b", "**2"), (r"\bcubed\b", "**3")]
_VERBS = [  # "add 3 to 10" and friends: the operands' order as said
    (r"\badd (\S+) (?:to|and) (\S+)", r"\1 + \2"),
    (r"(\S+) and (\S+) together", r"\1 + \2"),
    (r"\bsubtract (\S+) from (\S+)", r"\2 - \1"),
    (r"\bmultiply (\S+) (?:by|and) (\S+)", r"\1 * \2"),
    (r"\bdivide (\S+) by (\S+)", r"\1 / \2")]
MAX_OPERAND = 10**15  # and exponents at most 64: an answer someone can say
_PROBLEM = re.compile(r"^[\d\s.+\-*/%()]+$")
# a run of numbers joined by operators: the sum inside "2165 + 244 244" or "9042 + 39 +"
_RUN = re.compile(r"\d+(?:\.\d+)?(?:\s*(?:\*\*|[+\-*/%])\s*\d+(?:\.\d+)?)+")


def arithmetic(query: str) -> str | None:
    """The query's arithmetic as an expression of numbers and + - * / % ** ( ), or None."""
    text = query.lower().replace("what's", "what is")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 4,817 -> 4817
    for pattern, to in _VERBS:
        text = re.sub(pattern, to, text)
    for pattern, to in _WORDS:
        text = re.sub(pattern, to, text)
    text = re.sub(r"[?!,]|\.(?!\d)", " ", text)
    kept = re.sub(r"[^\d\s.+\-*/%()]", " ", text)
    expression = " ".join(kept.split()).strip()
    if not re.search(r"\d", expression) or not re.search(r"[+\-*/%]", expression):
        return None
    if _PROBLEM.match(expression) and _parses(expression):
        return expression
    run = _RUN.search(expression)  # said with a slip around it: the first whole sum in it
    return run.group() if run else None


def _parses(expression: str) -> bool:
    try:
        ast.parse(expression, mode="eval")
    except SyntaxError:
        return False
    return True


def calculate(query: str) -> str:
    expression = arithmetic(query)
    if expression is None:
        raise ValueError("I could not find a sum in that")
    try:
        value = _evaluate(ast.parse(expression, mode="eval").body)
    except SyntaxError:
        raise ValueError(f"{expression} is not a sum I can read") from None
    except ZeroDivisionError:
        raise ValueError("that divides by zero") from None
    return f"{_spoken(expression)} is {_number(value)}."


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if abs(node.value) > MAX_OPERAND:
            raise ValueError("that number is too large for me")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("that power is too large for me")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError("that is not plain arithmetic")


def _number(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4f}".rstrip("0").rstrip(".")


def _spoken(expression: str) -> str:
    names = {"*": "times", "/": "divided by", "+": "plus", "-": "minus", "%": "modulo",
             "**": "to the power of"}
    parts = re.findall(r"\*\*|\d+(?:\.\d+)?|[+\-*/%()]", expression)
    return " ".join(names.get(p, _number(float(p)) if p[0].isdigit() else p) for p in parts)


CALCULATOR = Tool("calculator", calculate, lambda query: arithmetic(query) is not None)


# -- the clock --------------------------------------------------------------------------------

def tell_time(query: str) -> str:
    now = datetime.datetime.now().astimezone()
    if re.search(r"\b(date|day|today)\b", query.lower()):
        return f"Today is {now:%A, %d %B %Y}."
    return f"It is {now:%H:%M}."


CLOCK = Tool("clock", tell_time,
             lambda query: bool(re.search(r"\bwhat time\b|\bthe time\b|\bwhat day\b|"
                                          r"\btoday's date\b|\bthe date\b", query.lower())))
