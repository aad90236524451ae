"""The calculator tool: arithmetic evaluated by walking the expression's syntax tree.

There is no `eval`: only number literals, + - * / // % **, unary + and -, parentheses, and
the functions and constants listed below are understood; any other name, attribute,
call, subscript or lambda is refused before anything runs. Sizes are checked before
they are computed, so `9**9**9` (a number of 370 million digits) is refused at once
instead of hanging the agent.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from .tools import ToolError, tool

MAX_LENGTH = 500  # characters of one expression
MAX_DEPTH = 100  # nesting of operators and calls
MAX_INT_BITS = 10_000  # about 3,000 decimal digits
MAX_COMBINATORIAL = 5_000  # largest n for factorial, comb and perm


class CalculatorError(ToolError):
    """An expression the calculator does not evaluate, with the reason."""


def _small(name: str, function: Callable[..., int]) -> Callable[..., int]:
    """factorial, comb, perm: refuse arguments whose result could not be shown anyway."""

    def guarded(*args: Any) -> int:
        if any(isinstance(a, int) and abs(a) > MAX_COMBINATORIAL for a in args):
            raise CalculatorError(f"{name}() is limited to arguments up to {MAX_COMBINATORIAL}")
        return function(*args)

    return guarded


def _round(x: Any, digits: int = 0) -> Any:
    if not isinstance(digits, int) or abs(digits) > 100:  # round(5, -10**9) would compute 10**(10**9)
        raise CalculatorError("round() takes a whole number of digits between -100 and 100")
    return round(x, digits) if digits else round(x)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": _round, "min": min, "max": max,
    "sqrt": math.sqrt, "isqrt": math.isqrt, "cbrt": lambda x: math.copysign(abs(x) ** (1 / 3), x),
    "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2, "ln": math.log,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
    "atan": math.atan, "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "degrees": math.degrees, "radians": math.radians, "hypot": math.hypot,
    "floor": math.floor, "ceil": math.ceil, "trunc": math.trunc, "gcd": math.gcd, "lcm": math.lcm,
    "factorial": _small("factorial", math.factorial), "comb": _small("comb", math.comb),
    "perm": _small("perm", math.perm),
}  # fmt: skip
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression, or a CalculatorError saying why not."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise CalculatorError(f"not an arithmetic expression ({getattr(exc, 'msg', exc)}): {expression.strip()!r}") from None
    try:
        return _checked(_eval(tree.body, 0))
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    except (TypeError, ValueError) as exc:  # sqrt(-1), log(0), min() ...
        raise CalculatorError(str(exc)) from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None


def format_number(value: int | float) -> str:
    """Integers exactly; floats to 15 significant digits (0.1 + 0.2 shows as 0.3)."""
    return str(value) if isinstance(value, int) else format(value, ".15g")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value: numbers, + - * / // % **,
    parentheses, functions such as sqrt, log, exp, sin, cos, round, min, max, factorial,
    and the constants pi and e.

    Args:
        expression: the expression to evaluate, e.g. "2 * (3 + 4) ** 2" or "sqrt(2) / 2".
    """
    return format_number(evaluate(expression))


def _eval(node: ast.AST, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CalculatorError("the expression is nested too deeply")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r}; the constants are {', '.join(CONSTANTS)}")
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise CalculatorError("'^' is not a power here: write 2 ** 3 for two to the third")
        op = _BINARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"the operator {type(node.op).__name__} is not supported; use + - * / // % **")
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        _check_size(node.op, left, right)
        return _checked(op(left, right))
    if isinstance(node, ast.UnaryOp):
        op = _UNARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"the operator {type(node.op).__name__} is not supported; use + - * / // % **")
        return op(_eval(node.operand, depth + 1))
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            hint = f"; write {node.func.attr}(...)" if node.func.attr in FUNCTIONS else ""
            raise CalculatorError(f"attributes are not allowed: {ast.unparse(node.func)!r}{hint}")
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            raise CalculatorError(f"unknown function {name or ast.unparse(node.func)!r}; the functions are {', '.join(FUNCTIONS)}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalculatorError(f"{name}() takes plain positional arguments only")
        return _checked(FUNCTIONS[name](*(_eval(a, depth + 1) for a in node.args)))
    if isinstance(node, ast.Attribute):
        raise CalculatorError(f"attributes are not allowed: {ast.unparse(node)!r}")
    raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression: {ast.unparse(node)!r}")


def _check_size(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse an integer power or product too large to compute quickly and show."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
        if bits > MAX_INT_BITS:
            raise CalculatorError(f"the result is too large: about {int(bits * math.log10(2)):,} digits (the limit is {_max_digits():,})")
    if isinstance(op, ast.Mult) and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise CalculatorError(f"the result is too large (the limit is {_max_digits():,} digits)")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("the result is a complex number (a fractional power of a negative number?)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number (it overflowed or is undefined)")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"the result is too large (the limit is {_max_digits():,} digits)")
    return value


def _max_digits() -> int:
    return int(MAX_INT_BITS * math.log10(2))
