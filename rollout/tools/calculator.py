"""Arithmetic the model can trust: an expression is parsed with `ast` and only numbers, the
arithmetic operators and parentheses are evaluated, so nothing the model writes ever runs as code.

Python integers are unbounded, which makes `9**9**9` a denial of service rather than an answer;
exponents and result sizes are capped so one call stays cheap.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from rollout.tools.base import ToolError

MAX_EXPONENT = 1000
MAX_DIGITS = 1000
MAX_EXPRESSION_CHARS = 2000
_DIGITS_BOUND = 10**MAX_DIGITS  # the smallest integer with more than MAX_DIGITS digits

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}

Number = int | float


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression; ToolError for anything that is not plain arithmetic."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"calculator: expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"calculator: not an arithmetic expression: {e.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"calculator: only numbers are allowed, got {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT and abs(left) not in (0, 1):
            raise ToolError(f"calculator: exponent {right} is too large (at most {MAX_EXPONENT})")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("calculator: division by zero") from None
        except OverflowError:
            raise ToolError("calculator: result too large") from None
        if isinstance(result, complex):
            raise ToolError(f"calculator: {left} {_SYMBOLS[type(node.op)]} {right} is not a real number")
        return _checked(result)
    raise ToolError(f"calculator: not allowed in an expression: {_describe(node)}")


def _checked(value: Number) -> Number:
    """Refuse results too big to print or to keep computing with."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("calculator: result is not a finite number")
    if isinstance(value, int) and abs(value) >= _DIGITS_BOUND:
        raise ToolError(f"calculator: result has more than {MAX_DIGITS} digits")
    return value


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    if isinstance(node, ast.Call):
        return "function calls"
    if isinstance(node, ast.Attribute):
        return f"attribute .{node.attr}"
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return f"operator {type(node.op).__name__}"
    return type(node).__name__


def format_number(value: Number) -> str:
    """Integers as integers (also 6/3 -> "2"); other floats with 12 significant digits."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:.12g}"


class Calculator:
    name = "calculator"
    description = (
        "Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses. "
        "Example: (17 * 24) - 3 ** 2"
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "the expression, e.g. 12 * (3 + 4)"}},
        "required": ["expression"],
    }

    async def call(self, arguments: dict[str, Any]) -> str:
        expression = arguments.get("expression") if isinstance(arguments, dict) else None
        if not isinstance(expression, str) or not expression.strip():
            raise ToolError('calculator: needs {"expression": "<arithmetic expression>"}')
        return format_number(evaluate(expression))

    async def close(self) -> None:
        pass
