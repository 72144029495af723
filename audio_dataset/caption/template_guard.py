"""Time and size bounds on rendering a model folder's chat template.

A chat template is Jinja read from the model folder (chat_template.jinja, chat_template.json,
tokenizer_config.json): untrusted. transformers renders it in jinja2's sandbox, so it runs no Python
and `range` is capped, but nested loops can run for hours and `'x' * 10**8` builds 100 MB. Jinja
compiles a template to Python code, so a trace function (this thread only, no signal, no process)
sees every line it runs: past RENDER_SECONDS, or once its output, a string or list it holds, or any
call's result passes MAX_PROMPT_CHARS, the trace raises TemplateLimit inside the render (the
deadline in the template's or jinja's own code, where nothing catches it on its way out). One
operation runs in C, between two trace events: `*` and `**` are checked before they run (`_Guarded`;
a 30-character template's `7**(10**9)` computes for hours, and jinja would fold it at compile time),
so `'x' * 10**10` and huge integers are refused. So is a call or filter that would build past the
bound from arguments each within it, before it runs (`_check_call`): a size argument over
MAX_PROMPT_CHARS to any built-in method or filter (`'x'|center(10**10)`, `.ljust`, `to_bytes`), a
`join`, `replace`, `expandtabs`, `translate` or `indent` whose result's length, computed from its
inputs, is over it (`([s] * 10**4)|join` of a million-character `s`), `%` and `format` widths
summed past it, and a container whose text, counted over its tree (`_weight`), is past it. A `~`
chain compiles to one C join of all its operands: they are weighed before it runs. And what a
render's operations make in all (each `*`, `%`, call and filter result, each join) counts against
MAX_MADE_CHARS, kept or not, so memory built a bound at a time (a filter over a long sequence, a
literal of thousands of fresh strings) stops there.

The callers compile the template (`precompile`, untraced: its cost is bounded by its length) and
render a test conversation when the model loads (`refusal` turns a failure there into the one-line
error that refuses the model), and every real prompt goes through `bounded` too, since a template
can behave differently on one sample's data.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from audio_dataset.source import UserError

# A chat template renders in milliseconds (traced: a few); this leaves a busy machine's margin.
RENDER_SECONDS = 2.0
# Our prompts are a few kilobytes; a million characters is a quarter of a million tokens or more,
# past any model's context, so a sample whose prompt is longer would fail in generate anyway.
MAX_PROMPT_CHARS = 1_000_000
# Real chat templates are a few kilobytes (tool-calling ones under 20 kB); compiling one costs time
# in proportion to its length, and compiling happens outside the deadline (`precompile`).
MAX_TEMPLATE_CHARS = 256 * 1024
# Where a model folder keeps its chat template, in the order the error names them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "processor_config.json")
_JINJA_CODE = "<template>"  # the file name jinja compiles a template string under
# The largest integer `*` or `**` may make: a million bits (300,000 digits) divides in a fraction of
# a second (CPython's division is quadratic: 4M bits take seconds in one operation) and is far past
# any number a chat template prints.
MAX_NUMBER_BITS = 1_000_000
# What one render may make in all (each operation's result counted, kept or not): a real template
# makes a few times its prompt; this bounds memory built a bound at a time (a filter over a long
# sequence, a literal of many fresh strings), where each operation alone is within MAX_PROMPT_CHARS.
MAX_MADE_CHARS = 16 * MAX_PROMPT_CHARS
_JOINS = ("str_join", "markup_join")  # what jinja compiles `a ~ b ~ c` to: one C join of all operands
_ACTIVE = threading.local()  # the `_Watch` of the render running on this thread, for the environment's hooks


class TemplateLimit(Exception):
    """A chat template ran past RENDER_SECONDS, built more than MAX_PROMPT_CHARS or is longer than
    MAX_TEMPLATE_CHARS."""


@dataclass
class _Watch:
    seconds: float
    max_chars: int
    deadline: float
    written: int = 0
    weights: dict[int, tuple[Any, int]] = field(default_factory=dict)  # each container's `_weight`, walked once
    # The limit raised, kept: code between the trace and the caller (jinja's lexer) may catch it
    # and raise its own error instead (TemplateSyntaxError "took over 2 s"); `bounded` restores it.
    tripped: TemplateLimit | None = None
    made: int = 0  # characters the render's operations have made (MAX_MADE_CHARS)

    def trace(self, frame, event: str, arg: Any):
        # Past the deadline, raised in the template's code or jinja's, where it reaches the caller:
        # raised inside a library's (a regex parser's `except` and retry, a `__del__`), it was
        # caught or ignored and the render went on for minutes.
        if time.monotonic() > self.deadline and _is_jinja(frame.f_code.co_filename):
            raise self._trip(TemplateLimit(f"took over {self.seconds:g} s"))
        if event == "call" and frame.f_code.co_name in _JOINS and _is_jinja(frame.f_code.co_filename):
            self._join(frame.f_locals.get("seq"))  # before the one C call that joins them
        if event == "return" and isinstance(arg, _CONTAINERS) and _is_jinja(frame.f_code.co_filename):
            # a list's text, a tree of few objects and many leaves, made by the template or jinja's
            # filters (not the library's own tables: a tokenizer's vocabulary is no prompt)
            self._weigh(arg)
        if event == "return" and isinstance(arg, (str, list, tuple)) and len(arg) > self.max_chars:
            # Any call's result: `~` (jinja's str_join), a namespace's attribute read back
            # (`{% set ns.s = ns.s ~ ns.s %}` doubles out of sight of the template's locals).
            raise self._trip(self._too_long())
        if frame.f_code.co_filename == _JINJA_CODE:
            # A template's output is what its generator frames yield: count it as it is made.
            if event == "return" and isinstance(arg, str) and frame.f_code.co_flags & inspect.CO_GENERATOR:
                self.written += len(arg)
                if self.written > self.max_chars:
                    raise self._trip(self._too_long())
            elif event == "line":
                for v in frame.f_locals.values():
                    if isinstance(v, (str, list, tuple)) and len(v) > self.max_chars:
                        raise self._trip(self._too_long())  # a `{% set %}` string or list, never written out
                    if isinstance(v, _CONTAINERS):
                        self._weigh(v)
        return self.trace

    def _too_long(self) -> TemplateLimit:
        return TemplateLimit(f"built more than {self.max_chars:,} characters")

    def _join(self, operands: Any) -> None:
        if isinstance(operands, (list, tuple)):
            length = sum(self._weigh(operand) for operand in operands)
            if length > self.max_chars:
                raise self._trip(self._too_long())
            self.count(length)

    def count(self, length: int) -> None:
        """`length` more characters made by the render; past MAX_MADE_CHARS in all, it stops."""
        self.made += length
        if self.made > MAX_MADE_CHARS:
            raise self._trip(TemplateLimit(f"built more than {MAX_MADE_CHARS:,} characters in all"))

    def _weigh(self, value: Any) -> int:
        try:
            return _weight(value, self.weights, self.max_chars)
        except TemplateLimit as limit:
            raise self._trip(limit) from None

    def _trip(self, limit: TemplateLimit) -> TemplateLimit:
        self.tripped = limit
        return limit


def _is_jinja(filename: str) -> bool:
    return filename == _JINJA_CODE or f"{os.sep}jinja2{os.sep}" in filename


_TEXTS = (str, bytes, bytearray)
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _weight(value: Any, known: dict[int, tuple[Any, int]] | None = None, limit: int = MAX_PROMPT_CHARS) -> int:
    """About the length of `value`'s text (its repr, its json), a container's counted over its whole
    tree: `[s] * 1000` is short and its text is a thousand `s`; a list doubled into itself 40 times
    holds 2**40 leaves in 40 objects (its repr or hash runs for hours in one C call). Each container
    is walked once (`known`, by id, holding the object); the walk stops once past `limit`."""
    known = {} if known is None else known
    if not isinstance(value, _CONTAINERS):
        return len(value) if isinstance(value, _TEXTS) else value.bit_length() // 3 + 1 \
            if isinstance(value, int) else 1
    stack, open_ = [value], set()
    while stack:
        node = stack[-1]
        if id(node) in known:
            stack.pop()
            continue
        items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        pending = [c for c in items if isinstance(c, _CONTAINERS) and id(c) not in known and id(c) not in open_]
        if pending and id(node) not in open_:
            open_.add(id(node))
            stack.extend(pending)
            continue
        total = 2 + 2 * len(items)
        for item in items:
            total += known[id(item)][1] if id(item) in known else 0 if isinstance(item, _CONTAINERS) else \
                len(item) if isinstance(item, _TEXTS) else item.bit_length() // 3 + 1 if isinstance(item, int) else 1
            if total > limit:
                raise TemplateLimit(f"built more than {limit:,} characters")
        known[id(node)] = (node, total)
        open_.discard(id(node))
        stack.pop()
    return known[id(value)][1]


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a `*` or `**` whose result would be past the bounds, before it runs."""
    if operator == "*":
        if isinstance(left, int) and isinstance(right, (*_TEXTS, list, tuple)):
            left, right = right, left
        if isinstance(left, (*_TEXTS, list, tuple)) and isinstance(right, int):
            if _weight(left) * right > MAX_PROMPT_CHARS:
                raise TemplateLimit(f"built more than {MAX_PROMPT_CHARS:,} characters")
        elif isinstance(left, int) and isinstance(right, int) \
                and left.bit_length() + right.bit_length() > MAX_NUMBER_BITS:
            raise TemplateLimit(f"made a number of more than {MAX_NUMBER_BITS:,} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if left.bit_length() * right > MAX_NUMBER_BITS:
            raise TemplateLimit(f"made a number of more than {MAX_NUMBER_BITS:,} bits")


# A %-conversion's width and precision (`%9d`, `%-*.3f`, `%(name)9s`): a number, or `*` (the next argument).
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def _too_big(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > MAX_PROMPT_CHARS


def _text_length(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(str(value)) if isinstance(value, (int, float)) else 0


def _check_format(text: Any, args: tuple[Any, ...], percent: bool = True) -> None:
    """A `%` or `format` whose widths and precisions, summed, would pad past the bound
    (`'%9999999999d' % 1`, `'%*d' % (10**10, 1)`, `('%999999s' * 3000) % values`); a format field
    whose spec holds a nested field (`'{:{}}'.format(1, '9999999999')`) is refused outright. A
    value (`'%d' % 1700000000`) is not a width."""
    if not isinstance(text, str):
        return
    widths, taken = 0, 0
    if percent:
        for width, precision, kind in _PERCENT_SPEC.findall(text):
            for number in (width, precision):
                if number == "*":
                    value = args[taken] if taken < len(args) else 0
                    taken += 1
                    widths += value if isinstance(value, int) else 0
                elif number:
                    widths += int(number)
            taken += kind != "%"
    else:
        import _string

        try:
            fields = [spec for _, name, spec, _ in _string.formatter_parser(text) if name is not None]
        except ValueError:
            return  # str.format raises the same error
        if any("{" in spec for spec in fields):
            raise TemplateLimit(f"formats a nested width (a width of more than {MAX_PROMPT_CHARS:,}?)")
        widths = sum(int(number) for spec in fields for number in re.findall(r"\d+", spec))
    if widths > MAX_PROMPT_CHARS:
        raise TemplateLimit(f"formats a width of more than {MAX_PROMPT_CHARS:,}")


def _joined_length(separator: Any, parts: Any) -> int:
    if not isinstance(parts, (list, tuple)) or not parts:
        return 0  # another iterable: a generator runs Python code, which the trace sees
    return len(str(separator)) * (len(parts) - 1) + sum(_text_length(part) for part in parts)


def _replaced_length(text: Any, old: Any, new: Any) -> int:
    if not all(isinstance(v, str) for v in (text, old, new)):
        return 0
    places = len(text) + 1 if not old else len(text) // len(old)
    return len(text) + places * max(0, len(new) - len(old))


def _check_call(name: str, receiver: Any, args: tuple[Any, ...], kwargs: dict[str, Any], method: bool = False) -> None:
    """Refuse a call that would build a result past MAX_PROMPT_CHARS from arguments within it:
    `receiver` is a method's object or a filter's value, `args` the rest."""
    values = (*args, *kwargs.values())
    if name in ("format", "format_map"):  # the method is str.format; the filter is %
        _check_format(receiver, values, percent=not method)
        return
    length = 0
    if name == "join":  # the method, separator.join(parts); the filter, parts|join(separator)
        separator, parts = (receiver, args[0] if args else ()) if isinstance(receiver, str) else \
            (args[0] if args else kwargs.get("d", ""), receiver)
        length = _joined_length(separator, parts)
    elif name == "replace" and len(values) >= 2:
        length = _replaced_length(receiver, values[0], values[1])
    elif name == "expandtabs" and isinstance(receiver, _TEXTS) and values and isinstance(values[0], int):
        length = len(receiver) * max(1, values[0])  # every character a tab, each as wide as the tab size
    elif name == "translate" and isinstance(receiver, str) and values and isinstance(values[0], dict):
        length = len(receiver) * max([1, *(len(v) for v in values[0].values() if isinstance(v, str))])
    elif name == "indent" and values:  # the filter: every line gets the indent (a width, or a string)
        width = values[0] if isinstance(values[0], (int, str)) else 0
        width = width if isinstance(width, int) and not isinstance(width, bool) else len(width)
        length = _text_length(receiver) + (str(receiver).count("\n") + 1) * width
    elif not method and name in ("tojson", "string", "pprint", "list", "join", "sum", "unique", "sort", "dictsort",
                                 "e", "escape", "forceescape", "safe", "urlencode", "xmlattr", "trim", "upper",
                                 "lower", "title", "capitalize", "first", "last", "max", "min", "groupby", "map",
                                 "select", "reject", "selectattr", "rejectattr", "batch", "slice", "length", "count"):
        _weight(receiver)  # a container whose text or tree is past the bound (its repr, its hash, its json)
    if length > MAX_PROMPT_CHARS or any(_too_big(value) for value in values):
        raise TemplateLimit(f"asked {name} to build more than {MAX_PROMPT_CHARS:,} characters")


def _made(value: Any) -> Any:
    """`value`, a template operation's result, counted against the running render's MAX_MADE_CHARS."""
    watch = getattr(_ACTIVE, "watch", None)
    if watch is not None and isinstance(value, (*_TEXTS, *_CONTAINERS)):
        watch.count(watch._weigh(value))
    return value


def _checked_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose arguments `_check_call` sees first (jinja calls filters directly, not
    through the environment's `call`); its pass_context/pass_environment marks are kept."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip:
            _check_call(name, args[skip], args[skip + 1:], kwargs)
        return _made(function(*args, **kwargs))

    return checked


class _CheckedFilters(dict):
    """The environment's filters, each checked (`_checked_filter`), those set later too: transformers
    sets its own tojson once the environment is made."""

    def __init__(self, filters: dict[str, Callable[..., Any]]) -> None:
        super().__init__()
        for name, function in filters.items():
            self[name] = function

    def __setitem__(self, name: str, function: Callable[..., Any]) -> None:
        super().__setitem__(name, _checked_filter(name, function))


_BUILTIN_METHODS = ("builtin_function_or_method", "method-wrapper", "method_descriptor")


@functools.cache  # one class, made once jinja is imported
def _guarded_environment() -> type:
    """transformers' ImmutableSandboxedEnvironment with `*` and `**` checked (`_check_binop`); jinja
    neither folds intercepted operators at compile time nor runs them without the check."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Guarded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.filters = _CheckedFilters(self.filters)

        def call_binop(self, context, operator, left, right):
            if operator == "%" and isinstance(left, str):
                _check_format(left, right if isinstance(right, tuple) else (right,))
            else:
                _check_binop(operator, left, right)
            return _made(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            # str.format comes wrapped by the sandbox (`__wrapped__` is the bound method)
            receiver = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if receiver is not None and not inspect.ismodule(receiver) and \
                    type(getattr(__obj, "__wrapped__", __obj)).__name__ in _BUILTIN_METHODS:
                # a built-in method (of a str, bytes, int, list, dict...): it runs in C, out of the trace's sight
                _check_call(getattr(__obj, "__name__", ""), receiver, args, kwargs, method=True)
            return _made(super().call(__context, __obj, *args, **kwargs))

    return _Guarded


def bounded(render: Callable[[], str], seconds: float = RENDER_SECONDS, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """render(), raising TemplateLimit once it runs past `seconds` or builds past `max_chars`."""
    watch = _Watch(seconds, max_chars, time.monotonic() + seconds)
    previous = sys.gettrace()  # a debugger's or coverage's: back once the render ends
    outer, _ACTIVE.watch = getattr(_ACTIVE, "watch", None), watch
    sys.settrace(watch.trace)
    try:
        rendered = render()
    except Exception:
        if watch.tripped is not None:
            raise watch.tripped from None
        raise
    finally:
        sys.settrace(previous)
        _ACTIVE.watch = outer
    if not isinstance(rendered, str):
        raise TemplateLimit(f"rendered a {type(rendered).__name__}, not text")
    if len(rendered) > max_chars:
        raise watch._too_long()
    return rendered


def precompile(template: Any) -> None:
    """Compile `template` (one string, or a dict of named ones) into transformers' cache before any
    traced render: jinja's compiler is Python, so traced, a long legitimate template could spend a
    busy machine's deadline compiling. Its length is checked first; a syntax error raises here."""
    from transformers.utils import chat_template_utils

    if getattr(chat_template_utils, "ImmutableSandboxedEnvironment", None) is not _guarded_environment():
        # transformers builds its environment from this name: guarded from here on, and nothing
        # compiled before stays cached.
        chat_template_utils.ImmutableSandboxedEnvironment = _guarded_environment()
        if hasattr(getattr(chat_template_utils, "_compile_jinja_template", None), "cache_clear"):
            chat_template_utils._compile_jinja_template.cache_clear()
    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)  # cached by transformers
    for text in (template.values() if isinstance(template, dict) else [template]):
        if not isinstance(text, str):
            continue
        if len(text) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit(f"is {len(text):,} characters long (at most {MAX_TEMPLATE_CHARS:,})")
        if compile_template is not None:
            compile_template(text)


def template_file(folder: str | Path | None, template: Any) -> str:
    """The file in `folder` that holds `template`, for an error message (the folder if none matches)."""
    if folder is None:
        return "its chat template"
    for name in TEMPLATE_FILES:
        if _holds(Path(folder) / name, template):
            return str(Path(folder) / name)
    return f"the chat template in {folder}"


def _holds(path: Path, template: Any) -> bool:
    try:
        if path.stat().st_size > 64 * 2**20:
            return False
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jinja":
            return text == template
        found = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return False
    value = found.get("chat_template") if isinstance(found, dict) else None
    if isinstance(value, list):  # several named templates: [{"name": ..., "template": ...}]
        return any(isinstance(v, dict) and v.get("template") == template for v in value)
    return value == template


def refusal(flag: str, spec: str, folder: str | Path | None, template: Any, exc: Exception) -> UserError:
    """The one line that refuses a model whose chat template fails on a test conversation."""
    reason = str(exc) if isinstance(exc, TemplateLimit) else \
        f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return UserError(f"{flag} {spec}: its chat template ({template_file(folder, template)}) failed a test render: "
                     f"{reason}")


__all__ = ["MAX_NUMBER_BITS", "MAX_PROMPT_CHARS", "MAX_TEMPLATE_CHARS", "RENDER_SECONDS", "TemplateLimit", "bounded",
           "precompile", "refusal", "template_file"]
