"""Tools an agent can call. A typed Python function with a docstring is the tool: its JSON
schema is derived from the type hints and the docstring, as Lagent's `tool_api` does, so the
description the model reads and the code that runs cannot drift apart.

    from typing import Literal
    from hanlin.agents import Toolbox, tool

    @tool
    def weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''The current weather in a city.

        Args:
            city: the city's name, e.g. "Hangzhou".
            unit: degrees Celsius or Fahrenheit.
        '''
        ...

    box = Toolbox([weather])
    box.schemas()                                 # the OpenAI `tools` list /v1/chat/completions takes
    box.run("weather", '{"city": "Hangzhou"}')    # ToolResult(name, ok, content): never raises

Arguments are checked against the schema before the function runs (a missing, unknown or
wrongly typed one is a ToolError naming it). A tool refuses with ToolError too (a path
outside the workspace); anything else it raises becomes an "Error: ..." text. Agents use
run(), which turns all of these into a ToolResult the model reads and can recover from:
a tool never crashes the agent loop.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Union

# what /v1/chat/completions accepts as a function name (apps/server/chat.py FunctionDef)
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# docstring sections that end the Args section (Google style)
_SECTIONS = re.compile(r"^(Args|Arguments|Parameters|Returns?|Yields?|Raises|Examples?|Notes?|See Also|Attributes):\s*$")
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number"}


class ToolError(Exception):
    """A call that cannot be made as asked (bad arguments, unknown tool), or a tool's own
    refusal; the message is written for the model to read and correct itself."""

    def __init__(self, message: str, *, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter  # the argument at fault, when there is one


@dataclass(frozen=True)
class ToolResult:
    """What a call gave back: `content` is what the model reads next; `ok` is False when the
    call was refused or the tool raised (then `content` starts with "Error:")."""

    name: str
    ok: bool
    content: str


@dataclass(frozen=True, eq=False)
class Tool:
    """A callable the model may use, with the JSON schema of its arguments.

    Usually made by `@tool` from a function; built directly, `parameters` is a JSON Schema
    object and `function` is called with the validated arguments as keywords.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(self.parameters, dict) or self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON Schema object ({{'type': 'object', ...}})")
        if not callable(self.function):
            raise TypeError(f"tool {self.name!r}: function must be callable")

    @classmethod
    def from_function(cls, function: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> Tool:
        """The tool a typed, documented function describes (see the module docstring)."""
        name = name or getattr(function, "__name__", "")
        if not NAME.fullmatch(name):
            raise ValueError(f"tool name {name!r} must be 1-64 letters, digits, '_', '.' or '-'; pass tool(name=...)")
        summary, parameters = function_schema(function, name)
        return cls(name, description if description is not None else summary, parameters, function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Decorated functions stay plain functions for Python callers."""
        return self.function(*args, **kwargs)

    def schema(self) -> dict[str, Any]:
        """This tool in the OpenAI `tools` format."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def validate(self, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
        """The keyword arguments for the function, or a ToolError naming what is wrong.

        `arguments` is a dict or its JSON text (what a model's tool call carries); None or
        "" mean no arguments. null for an optional parameter means "use the default"."""
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}
        if isinstance(arguments, (str, bytes)):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise ToolError(f"{self.name}: the arguments are not valid JSON ({exc}): {_clip(arguments)}") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name}: the arguments must be a JSON object of parameter names to values, got {_describe(arguments)}")
        properties = self.parameters.get("properties", {})
        required = self.parameters.get("required", [])
        if self.parameters.get("additionalProperties") is False:
            for key in arguments:
                if key not in properties:
                    known = ", ".join(properties) or "none"
                    raise ToolError(f"{self.name}: unknown parameter {key!r}; the parameters are: {known}", parameter=key)
        for key in required:
            if key not in arguments:
                raise ToolError(f"{self.name}: missing required parameter {key!r} ({_expected(properties.get(key, {}))})", parameter=key)
        checked = {}
        for key, value in arguments.items():
            if value is None and key not in required:
                continue
            checked[key] = _check(value, properties.get(key, {}), key, self.name)
        return checked

    def call(self, arguments: dict[str, Any] | str | None = None) -> str:
        """Run the tool and return its result as text.

        A refused call raises ToolError: bad arguments, or the tool's own refusal. Any other
        exception inside the tool comes back as an "Error: <type>: <message>" text."""
        return self._call(self.validate(arguments))[1]

    def run(self, arguments: dict[str, Any] | str | None = None) -> ToolResult:
        """Like call(), but never raises: a refusal is an error result as well."""
        try:
            ok, content = self._call(self.validate(arguments))
        except ToolError as exc:
            return ToolResult(self.name, False, f"Error: {exc}")
        return ToolResult(self.name, ok, content)

    def _call(self, kwargs: dict[str, Any]) -> tuple[bool, str]:
        for name in self._fill_none:  # an Optional parameter without a default, left out
            kwargs.setdefault(name, None)
        try:
            return True, _as_text(self.function(**kwargs))
        except ToolError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the model reads it; the agent loop goes on
            return False, f"Error: {type(exc).__name__}: {exc}"

    @functools.cached_property
    def _fill_none(self) -> tuple[str, ...]:
        try:
            params = inspect.signature(self.function).parameters.values()
        except (TypeError, ValueError):
            return ()
        required = set(self.parameters.get("required", []))
        return tuple(p.name for p in params if p.default is p.empty and p.name not in required
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))  # fmt: skip


def tool(function: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None) -> Any:
    """Make a function a Tool: `@tool`, or `@tool(name=..., description=...)` to override
    what the function's own name and docstring say."""
    if function is None:
        return lambda f: Tool.from_function(f, name=name, description=description)
    return Tool.from_function(function, name=name, description=description)


class Toolbox:
    """The tools an agent may use, by name; `schemas()` is the list the model is shown."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable[..., Any]) -> Tool:
        t = t if isinstance(t, Tool) else Tool.from_function(t)
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already in the toolbox")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __getitem__(self, name: str) -> Tool:
        if name not in self._tools:
            raise KeyError(self._unknown(name))
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """All tools in the OpenAI `tools` format (what ChatRequest.tools validates)."""
        return [t.schema() for t in self._tools.values()]

    def call(self, name: str, arguments: dict[str, Any] | str | None = None) -> str:
        """Tool.call by name; an unknown name is a ToolError that lists the known ones."""
        t = self._tools.get(name)
        if t is None:
            raise ToolError(self._unknown(name))
        return t.call(arguments)

    def run(self, name: str, arguments: dict[str, Any] | str | None = None) -> ToolResult:
        """Tool.run by name: never raises, whatever the model asked for."""
        t = self._tools.get(name)
        if t is None:
            return ToolResult(str(name), False, f"Error: {self._unknown(name)}")
        return t.run(arguments)

    def _unknown(self, name: object) -> str:
        return f"there is no tool named {name!r}; the tools are: {', '.join(self._tools) or 'none'}"


# ---------------------------------------------------------------------------------------
# Schema from a function


def function_schema(function: Callable[..., Any], name: str = "") -> tuple[str, dict[str, Any]]:
    """(description, parameters JSON Schema) of a typed, documented function.

    The description is the docstring's first paragraph; each parameter's description comes
    from the Google-style `Args:` section (or an `Annotated[type, "text"]` hint). A parameter
    with a default, or typed Optional, is not required. A parameter without a type hint, or
    with a type JSON cannot carry, is a TypeError here, when the tool is made, not when the
    model first calls it."""
    label = f"tool {name or getattr(function, '__name__', '?')!r}"
    summary, documented = parse_docstring(inspect.getdoc(function) or "")
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as exc:  # noqa: BLE001 - a forward reference that does not resolve
        raise TypeError(f"{label}: cannot read the type hints ({exc})") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(function).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"{label}: parameter {p.name!r} must be passable by keyword (no *args, **kwargs or /)")
        if p.name not in hints:
            raise TypeError(f"{label}: parameter {p.name!r} has no type hint; give it one (str, int, float, bool, list[...], Literal[...])")
        schema, optional, note = _type_schema(hints[p.name], f"{label}: parameter {p.name!r}")
        text = documented.get(p.name) or note
        if text:
            schema = {**schema, "description": text}
        if p.default is not p.empty:
            if p.default is not None and _jsonable(p.default):
                schema["default"] = p.default
        elif not optional:
            required.append(p.name)
        properties[p.name] = schema
    return summary, {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph as one line, {parameter: description}) of a Google-style docstring."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTIONS.match(line.strip()):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    inside, indent, current, entry_depth = False, 0, None, 0
    for line in lines:
        stripped = line.strip()
        depth = len(line) - len(line.lstrip())
        if not inside:
            if re.match(r"^(Args|Arguments|Parameters):\s*$", stripped):
                inside, indent, current = True, depth, None
            continue
        if not stripped:
            continue
        if depth <= indent:  # the next section, or the end of this one
            inside = False
            if re.match(r"^(Args|Arguments|Parameters):\s*$", stripped):
                inside, current = True, None
            continue
        entry = re.match(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
        if entry and (current is None or depth <= entry_depth):
            current, entry_depth = entry.group(1), depth
            args[current] = entry.group(2).strip()
        elif current is not None:  # a continuation line of the current entry
            args[current] = f"{args[current]} {stripped}".strip()
    return " ".join(summary), args


def _type_schema(hint: Any, where: str) -> tuple[dict[str, Any], bool, str]:
    """(JSON Schema, optional?, description from Annotated) of one type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        schema, optional, _ = _type_schema(args[0], where)
        note = next((a for a in args[1:] if isinstance(a, str)), "")
        return schema, optional, note
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        optional = len(members) < len(args)
        schemas = [_type_schema(m, where)[0] for m in members]
        return (schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), optional, ""
    if origin is Literal:
        values = list(args)
        if not values or any(type(v) not in _JSON_TYPES for v in values):
            raise TypeError(f"{where}: Literal values must be str, int, float or bool, got {hint!r}")
        kinds = {_JSON_TYPES[type(v)] for v in values}
        return ({"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}), False, ""
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}, False, ""
    if hint in (list, tuple, set, frozenset):
        return {"type": "array"}, False, ""
    if origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) > 1:
            raise TypeError(f"{where}: fixed-length tuples are not supported; use list[...] or tuple[X, ...]")
        return ({"type": "array", "items": _type_schema(items[0], where)[0]} if items else {"type": "array"}), False, ""
    if hint is dict:
        return {"type": "object"}, False, ""
    if origin is dict:
        value = args[1] if len(args) == 2 else Any
        schema: dict[str, Any] = {"type": "object"}
        if value is not Any:
            schema["additionalProperties"] = _type_schema(value, where)[0]
        return schema, False, ""
    if hint is Any:
        return {}, False, ""
    raise TypeError(f"{where}: type {hint!r} has no JSON Schema here; use str, int, float, bool, list[...], dict[str, ...] or Literal[...]")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------
# Checking arguments against a schema (the subset _type_schema writes, plus enum/anyOf)


def _check(value: Any, schema: dict[str, Any], where: str, tool_name: str) -> Any:
    """`value`, converted where JSON is loose (3.0 for an integer), or a ToolError."""
    param = where.split("[", 1)[0]
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                return _check(value, option, where, tool_name)
            except ToolError:
                continue
        raise ToolError(f"{tool_name}: parameter {where!r} must be {_expected(schema)}, got {_describe(value)}", parameter=param)
    kind = schema.get("type")
    ok = True
    if kind == "string":
        ok = isinstance(value, str)
    elif kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "array":
        ok = isinstance(value, list)
        if ok and "items" in schema:
            value = [_check(v, schema["items"], f"{where}[{i}]", tool_name) for i, v in enumerate(value)]
    elif kind == "object":
        ok = isinstance(value, dict)
        if ok and isinstance(schema.get("additionalProperties"), dict):
            value = {k: _check(v, schema["additionalProperties"], f"{where}[{k!r}]", tool_name) for k, v in value.items()}
    if ok and "enum" in schema:  # compare with types: True is not 1 here
        ok = any(type(value) is type(e) and value == e for e in schema["enum"])
    if not ok:
        raise ToolError(f"{tool_name}: parameter {where!r} must be {_expected(schema)}, got {_describe(value)}", parameter=param)
    return value


def _expected(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(e) for e in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(_expected(s) for s in schema["anyOf"])
    kind = schema.get("type")
    item = schema.get("items", {}).get("type") if kind == "array" else None
    if item in _PLURALS:
        return f"a list of {_PLURALS[item]}"
    return {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
            "array": "a list", "object": "an object"}.get(kind, "any value")  # fmt: skip


_PLURALS = {"string": "strings", "integer": "integers", "number": "numbers", "boolean": "booleans", "array": "lists", "object": "objects"}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, str):
        return f"the string {_clip(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _clip(text: Any, limit: int = 80) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _as_text(value: Any) -> str:
    """A tool's return value as the text the model reads."""
    if isinstance(value, str):
        return value
    if value is None:
        return "(no result)"
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (dict, list, tuple, int, float, bool)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)
