"""The jinja2 environment chat templates run in, with limits.

The environment is the one ``transformers``' ``apply_chat_template`` renders in: jinja2's immutable
sandbox (no access to Python internals, no mutation of lists and dicts), ``trim_blocks`` /
``lstrip_blocks``, loop controls, ``tojson``, ``raise_exception`` and ``strftime_now``. A template
comes inside a model file (``tokenizer.chat_template`` of an APR, GGUF or Hugging Face tokenizer), which
is untrusted input like the rest of the file, and jinja's sandbox guards access, not time or memory.
So a render here is also bounded:

* **steps**: at most ``MAX_STEPS`` blocks (a loop's body, a branch, a macro call) and calls, and
  ``MAX_SECONDS``, per render: the code generator starts every block it writes with a call of the
  environment's ``step``, which counts and checks the deadline (a real template runs a few per message),
  and so does every call of a filter (``map``, ``select`` and the like call one per item, lazily);
* **sizes**: no string or list over ``MAX_SIZE`` items, and no integer over ``MAX_BITS`` bits, is
  made: ``*``, ``+``, ``**`` and ``%`` (printf widths), ``~`` concatenation, the rendered output, and
  every call (a method or a filter) are checked before they allocate (a width, count or repetition
  argument over ``MAX_SIZE``; ``replace``, ``join``, ``expandtabs``, ``indent`` and ``tojson`` by the
  size of their result; ``wordwrap`` by its input), and every result after; ``lipsum`` (paragraphs
  of filler on request) is not offered; a filter that loops over its items in Python (``sort``,
  ``unique``, ``map``, ...) takes at most ``MAX_ITEMS`` of them in one call, which is one step.

Over a limit, ``TemplateLimitError`` (a jinja ``SecurityError``); ``render_template`` in ``chat.py`` turns
it and any other failure of a template into one ``ValueError`` naming the record.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import threading
import time

MAX_STEPS = 5_000_000  # blocks (loop bodies, branches, macro calls) and calls one render may run
MAX_SECONDS = 10.0  # and the time it may take (a step may be a scan of MAX_SIZE items)
MAX_SIZE = 16 * 1024 * 1024  # characters (or items) of any string or list a template makes (a record of a
# 128k-token context is about 0.5 M characters)
MAX_WRAP = 65_536  # characters the wordwrap filter may wrap (textwrap is quadratic in a run of spaces)
MAX_BITS = 65_536  # of an integer made by * or ** (a power of millions of bits takes minutes to compute)
MAX_ITEMS = 1 << 20  # items one call of a filter that loops over them in Python may take (sort, unique, map, ...:
# up to 3.5 us an item on a slow core, so one call ends within about 4 s; 16 Mi characters sorted took 30 s)
# (the filters of jinja2.filters.FILTERS that loop in Python over the items of their first argument)
_ITERATING = frozenset({"do_sort", "do_unique", "do_dictsort", "do_groupby", "do_sum", "do_min", "do_max",
                        "do_join", "sync_do_join", "do_batch", "do_slice", "do_map", "do_select", "do_reject",
                        "do_selectattr", "do_rejectattr", "do_items"})

# printf conversions (%-08.3f) and str.format fields' specs ({:>10}; a width given as an argument,
# {:{}} or %*d, is an integer argument, checked as such)
_FORMAT_SPECS = re.compile(r"%[-#0 +]*\d*(?:\.\d*)?|\{[^{}]*:[^{}]*\}")


def _sandbox():
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class TemplateLimitError(jinja2.exceptions.SecurityError):
        """A chat template went over a step or size limit of this module."""

    def too_big(what: str, n: int, bits: bool = False):
        limit, unit = (MAX_BITS, "bits of an integer") if bits else (MAX_SIZE, "items")
        raise TemplateLimitError(f"{what} would make {n:,} {unit}; a chat template may make at most {limit:,}")

    def size(x, seen=None) -> int:
        """Characters and items ``str()`` of ``x`` grows with (nested lists and dicts counted through,
        each object once; stops counting past MAX_SIZE)."""
        if isinstance(x, str):
            return len(x)
        if not isinstance(x, (list, tuple, dict)):
            return 0
        seen = set() if seen is None else seen
        if id(x) in seen:
            return len(x)
        seen.add(id(x))
        n = len(x)
        for item in (x.items() if isinstance(x, dict) else x):
            n += size(item, seen)
            if n > MAX_SIZE:
                break
        return n

    def check_result(x, what: str):
        n = size(x)
        if n > MAX_SIZE:
            too_big(what, n)
        return x

    def check_widths(text, what: str) -> None:
        """printf (``%``) and str.format widths and precisions in ``text``."""
        if isinstance(text, str):
            widths = [int(w) for w in re.findall(r"\d+", " ".join(_FORMAT_SPECS.findall(text)))]
            if widths and max(widths) > MAX_SIZE:
                too_big(what, max(widths))

    def check_call(fn, args, kwargs) -> None:
        """Refuse a call before it allocates: an integer argument over MAX_SIZE (a width, count or
        repetition), a format width over it, and replace / join / expandtabs / indent whose result
        would be over it."""
        name = getattr(fn, "__name__", "")
        values = list(args) + list(kwargs.values())
        if name in _ITERATING and args and hasattr(args[0], "__len__") and len(args[0]) > MAX_ITEMS:
            raise TemplateLimitError(f"the filter {name.removeprefix('sync_').removeprefix('do_')} over "
                                     f"{len(args[0]):,} items; a chat template may give a filter that loops over "
                                     f"its items at most {MAX_ITEMS:,}")
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_SIZE:
                too_big(f"{name}() with the argument {v}", v)
        owner = getattr(fn, "__self__", getattr(getattr(fn, "__wrapped__", None), "__self__", None))
        own = [owner] if isinstance(owner, str) else []  # (a bound str method: the string is its self)
        first = (own + list(args))[:1]
        if name in ("format", "do_format") and first:
            check_widths(first[0], "format")
        if name in ("replace", "do_replace"):
            text_old_new = (own + list(args))[:3]
            if len(text_old_new) == 3 and all(isinstance(v, str) for v in text_old_new):
                text, old, new = text_old_new
                n = len(text) + (len(text) + 1 if old == "" else text.count(old)) * len(new)
                if n > MAX_SIZE:
                    too_big("replace()", n)
        if name == "do_wordwrap" and args and isinstance(args[0], str) and len(args[0]) > MAX_WRAP:
            raise TemplateLimitError(f"wordwrap of {len(args[0]):,} characters; a chat template may wrap at most "
                                     f"{MAX_WRAP:,} (textwrap takes time quadratic in a run of spaces)")
        if name in ("expandtabs", "do_indent"):  # (every tab / line widened by the integer)
            text, width = (own + list(args) + [kwargs.get("width", kwargs.get("tabsize", 8))])[:2]
            if isinstance(text, str) and isinstance(width, int):
                n = len(text) + (text.count("\t" if name == "expandtabs" else "\n") + 1) * width
                if n > MAX_SIZE:
                    too_big(f"{name}()", n)
        if name in ("join", "do_join", "sync_do_join"):
            parts_sep = (list(args[:1]) + own) if own else list(args[:2])
            parts = parts_sep[0] if parts_sep and isinstance(parts_sep[0], (list, tuple)) else None
            sep = parts_sep[1] if len(parts_sep) > 1 and isinstance(parts_sep[1], str) else ""
            if parts is not None:
                n = sum(size(p) for p in parts) + len(sep) * len(parts)
                if n > MAX_SIZE:
                    too_big("join()", n)

    passed = (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment)  # (jinja's own, first)

    def bounded(fn):
        @functools.wraps(fn)  # (keeps jinja's pass_context / pass_environment marks)
        def call(*args, **kwargs):
            env.step()  # (map, select and the like call a filter per item: a chain of them is bounded too)
            check_call(fn, [a for a in args if not isinstance(a, passed)], kwargs)
            return check_result(fn(*args, **kwargs), f"the filter {fn.__name__}")
        return call

    def checked_join(join):
        def joined(seq):
            seq = list(seq)
            n = sum(size(s) for s in seq)
            if n > MAX_SIZE:
                too_big("~ concatenation", n)
            return join(seq)
        return joined

    class StepCodeGenerator(CodeGenerator):
        """Jinja's code generator, every block it writes (a loop's body, a branch, a macro, the
        template) starting with a call of the environment's ``step``."""

        def blockvisit(self, nodes, frame):
            self.writeline("environment.step()")
            super().blockvisit(nodes, frame)

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = StepCodeGenerator

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.budget = threading.local()  # (steps and deadline of the render running in this thread)

        def start(self) -> None:
            self.budget.steps, self.budget.deadline = 0, time.monotonic() + MAX_SECONDS

        def step(self) -> None:
            b = self.budget
            b.steps += 1
            if b.steps > MAX_STEPS or time.monotonic() > b.deadline:
                raise TemplateLimitError(f"the template ran over {MAX_STEPS:,} steps or {MAX_SECONDS} s on one "
                                         f"conversation (a loop that does not end in reasonable time)")

        def call_binop(self, context, operator, left, right):
            if operator == "+" and type(left) is str and type(right) is str:  # (the common case, kept quick)
                if len(left) + len(right) > MAX_SIZE:
                    too_big("+", len(left) + len(right))
                return left + right
            if operator == "*":
                seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                made = size(seq) * max(n, 0) if isinstance(seq, (str, list, tuple)) and isinstance(n, int) else 0
                if made > MAX_SIZE:
                    too_big("*", made)
                bits = left.bit_length() + right.bit_length() if isinstance(left, int) and isinstance(right, int) else 0
                if bits > MAX_BITS:
                    too_big("*", bits, bits=True)
            elif operator == "**":
                if (isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
                        and right * math.log2(abs(left)) > MAX_BITS):
                    too_big(f"{left} ** {right}", int(right * math.log2(abs(left))), bits=True)
            elif operator == "+":
                made = size(left) + size(right)
                if made > MAX_SIZE:
                    too_big("+", made)
            elif operator == "%" and isinstance(left, str):
                check_widths(left, "% formatting")
                stars = right if isinstance(right, tuple) else (right,)
                if "*" in left and any(isinstance(v, int) and v > MAX_SIZE for v in stars):
                    too_big("% formatting", max(v for v in stars if isinstance(v, int)))
            result = super().call_binop(context, operator, left, right)
            # (* and + were sized exactly above; % can splice its arguments in)
            return check_result(result, operator) if operator == "%" else result

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's signature)
            __self.step()
            check_call(__obj, args, kwargs)
            return check_result(super().call(__context, __obj, *args, **kwargs), getattr(__obj, "__name__", "a call"))

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        """json.dumps, encoded piece by piece so that a nested value's text is refused past MAX_SIZE
        before it is all made (an indent repeats at every line)."""
        parts, n = [], 0
        encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                   sort_keys=sort_keys)
        for piece in encoder.iterencode(x):
            n += len(piece)
            if n > MAX_SIZE:
                too_big("tojson", n)
            parts.append(piece)
        return "".join(parts)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)
    return env, TemplateLimitError, checked_join


@functools.lru_cache(maxsize=1)
def _environment():
    return _sandbox()


@functools.lru_cache(maxsize=8)
def compiled(template: str):
    """``template`` compiled once (a corpus renders it per record), its ``~`` concatenation bounded."""
    env, _, checked_join = _environment()
    out = env.from_string(template)
    names = out.root_render_func.__globals__  # (the template module's own namespace)
    for join in ("str_join", "markup_join"):
        if join in names:
            names[join] = checked_join(names[join])
    return out


def render(template: str, **variables) -> str:
    """``template`` rendered with ``variables`` within the step, time and size limits
    (``TemplateLimitError`` past one; jinja's errors and Python's from the template's own operations
    pass through)."""
    env, limit_error, _ = _environment()
    env.start()  # (before the compile: jinja folds constant filter calls then, each a step of this render)
    tmpl = compiled(template)
    parts, n = [], 0
    for piece in tmpl.generate(**variables):
        n += len(piece)
        if n > MAX_SIZE:
            raise limit_error(f"the rendered text would pass {MAX_SIZE:,} characters")
        parts.append(piece)
    return "".join(parts)
