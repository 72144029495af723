"""Time and size bounds on rendering a model folder's chat template.

A chat template is Jinja read from the model folder (chat_template.jinja, chat_template.json,
tokenizer_config.json): untrusted. transformers renders it in jinja2's sandbox, so it runs no Python
and `range` is capped, but nested loops can run for hours and `'x' * 10**8` builds 100 MB. Jinja
compiles a template to Python code, so a trace function (this thread only, no signal, no process)
sees every line it runs: past RENDER_SECONDS, or once its output, a string or list it holds, or any
call's result passes MAX_PROMPT_CHARS, the trace raises TemplateLimit inside the render. One
operation runs in C, between two trace events: `*` and `**` are checked before they run (`_Guarded`;
a 30-character template's `7**(10**9)` computes for hours, and jinja would fold it at compile time),
so `'x' * 10**10` and huge integers are refused. So is a call or filter that would build past the
bound from arguments each within it, before it runs (`_check_call`): a size argument over
MAX_PROMPT_CHARS (`'x'|center(10**10)`, `.ljust`, `.zfill`, `indent`), a `join` or `replace` whose
result's length, computed from its inputs, is over it (`([s] * 10**4)|join` of a million-character
`s`), and a `%` or `format` with a width over it. Not bounded: a long template's `s ~ s ~ ... ~ s`
on one line (each `~` is one C call on values within bounds): refused once it returns.

The callers compile the template (`precompile`, untraced: its cost is bounded by its length) and
render a test conversation when the model loads (`refusal` turns a failure there into the one-line
error that refuses the model), and every real prompt goes through `bounded` too, since a template
can behave differently on one sample's data.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import sys
import time
from dataclasses import dataclass
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


class TemplateLimit(Exception):
    """A chat template ran past RENDER_SECONDS, built more than MAX_PROMPT_CHARS or is longer than
    MAX_TEMPLATE_CHARS."""


@dataclass
class _Watch:
    seconds: float
    max_chars: int
    deadline: float
    written: int = 0
    # The limit raised, kept: code between the trace and the caller (jinja's lexer) may catch it
    # and raise its own error instead (TemplateSyntaxError "took over 2 s"); `bounded` restores it.
    tripped: TemplateLimit | None = None

    def trace(self, frame, event: str, arg: Any):
        if time.monotonic() > self.deadline:
            raise self._trip(TemplateLimit(f"took over {self.seconds:g} s"))
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
            elif event == "line" and any(isinstance(v, (str, list, tuple)) and len(v) > self.max_chars
                                         for v in frame.f_locals.values()):
                raise self._trip(self._too_long())  # a `{% set %}` string or list, never written out
        return self.trace

    def _too_long(self) -> TemplateLimit:
        return TemplateLimit(f"built more than {self.max_chars:,} characters")

    def _trip(self, limit: TemplateLimit) -> TemplateLimit:
        self.tripped = limit
        return limit


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a `*` or `**` whose result would be past the bounds, before it runs."""
    if operator == "*":
        if isinstance(left, int) and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if isinstance(left, (str, list, tuple)) and isinstance(right, int):
            if len(left) * right > MAX_PROMPT_CHARS:
                raise TemplateLimit(f"built more than {MAX_PROMPT_CHARS:,} characters")
        elif isinstance(left, int) and isinstance(right, int) \
                and left.bit_length() + right.bit_length() > MAX_NUMBER_BITS:
            raise TemplateLimit(f"made a number of more than {MAX_NUMBER_BITS:,} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if left.bit_length() * right > MAX_NUMBER_BITS:
            raise TemplateLimit(f"made a number of more than {MAX_NUMBER_BITS:,} bits")


# A number in a format string (a width or precision, `%9d`, `{:>9}`); one past the bound pads past it.
_FORMAT_NUMBER = re.compile(r"\d{7,}")


def _too_big(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > MAX_PROMPT_CHARS


def _text_length(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(str(value)) if isinstance(value, (int, float)) else 0


def _check_format(text: Any, args: tuple[Any, ...]) -> None:
    """A `%` or `format` whose width or precision would pad past the bound (`'%9999999999d' % 1`,
    `'%*d' % (10**10, 1)`)."""
    if isinstance(text, str) and any(int(number) > MAX_PROMPT_CHARS for number in _FORMAT_NUMBER.findall(text)):
        raise TemplateLimit(f"formats a width of more than {MAX_PROMPT_CHARS:,}")
    if any(_too_big(arg) for arg in args):
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


def _check_call(name: str, receiver: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a call that would build a result past MAX_PROMPT_CHARS from arguments within it:
    `receiver` is a method's object or a filter's value, `args` the rest."""
    values = (*args, *kwargs.values())
    if name in ("format", "format_map"):
        _check_format(receiver, values)
        return
    length = 0
    if name == "join":  # the method, separator.join(parts); the filter, parts|join(separator)
        separator, parts = (receiver, args[0] if args else ()) if isinstance(receiver, str) else \
            (args[0] if args else kwargs.get("d", ""), receiver)
        length = _joined_length(separator, parts)
    elif name == "replace" and len(values) >= 2:
        length = _replaced_length(receiver, values[0], values[1])
    if length > MAX_PROMPT_CHARS or any(_too_big(value) for value in values):
        raise TemplateLimit(f"asked {name} to build more than {MAX_PROMPT_CHARS:,} characters")


def _checked_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose arguments `_check_call` sees first (jinja calls filters directly, not
    through the environment's `call`); its pass_context/pass_environment marks are kept."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip:
            _check_call(name, args[skip], args[skip + 1:], kwargs)
        return function(*args, **kwargs)

    return checked


@functools.cache  # one class, made once jinja is imported
def _guarded_environment() -> type:
    """transformers' ImmutableSandboxedEnvironment with `*` and `**` checked (`_check_binop`); jinja
    neither folds intercepted operators at compile time nor runs them without the check."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Guarded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.filters = {name: _checked_filter(name, f) for name, f in self.filters.items()}

        def call_binop(self, context, operator, left, right):
            if operator == "%" and isinstance(left, str):
                _check_format(left, right if isinstance(right, tuple) else (right,))
            else:
                _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            # str.format comes wrapped by the sandbox (`__wrapped__` is the bound method)
            receiver = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(receiver, (str, list, tuple)):  # a built-in method: it runs in C, out of the trace's sight
                _check_call(getattr(__obj, "__name__", ""), receiver, args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    return _Guarded


def bounded(render: Callable[[], str], seconds: float = RENDER_SECONDS, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """render(), raising TemplateLimit once it runs past `seconds` or builds past `max_chars`."""
    watch = _Watch(seconds, max_chars, time.monotonic() + seconds)
    previous = sys.gettrace()  # a debugger's or coverage's: back once the render ends
    sys.settrace(watch.trace)
    try:
        rendered = render()
    except Exception:
        if watch.tripped is not None:
            raise watch.tripped from None
        raise
    finally:
        sys.settrace(previous)
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
