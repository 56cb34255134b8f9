"""Built-in reward functions for ``grpo``, ``online-dpo``, ``generate --reward`` and ``eval --prompts``
(``--reward apr_kernels.rewards:NAME``), called as TRL calls reward functions:
``NAME(prompts=, completions=, completion_ids=, **record_fields) -> list[float | None]``.

* ``exact_match``: 1.0 when the completion's final answer equals the record's ``answer`` field, else
  0.0. The final answer is the last ``\\boxed{...}`` in the text, else what follows the last ``####``
  (GSM8K's convention, also read from the reference answer, so GSM8K's solutions can be the
  ``answer`` as they are), else the last number, else the last non-empty line. Numbers compare by
  value (``1,000``, ``$1000`` and ``1000.0`` are one answer), anything else as trimmed, case-folded
  text. A record without an ``answer`` gets None (not applicable).
* ``think_format``: 1.0 when the completion is ``<think>...</think>`` followed by the answer (one
  reasoning block, first; TRL's ``think_format_reward``), else 0.0.

Chat completions (a list of messages) are scored on the last message's content.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THINK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)


def _text(completion) -> str:
    if isinstance(completion, list):  # chat: the assistant's message
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def _boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def final_answer(text: str) -> str | None:
    """The answer a text ends with (module docstring), or None."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _normal(answer: str):
    """A number as a float, else trimmed case-folded text (``$``, ``,`` and a final ``.`` dropped)."""
    a = answer.strip().strip("$").rstrip(".").replace(",", "").strip()
    try:
        return float(a)
    except ValueError:
        return " ".join(a.casefold().split())


def same_answer(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    x, y = _normal(a), _normal(b)
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= 1e-6 * max(1.0, abs(y))
    return x == y


def exact_match(prompts=None, completions=(), answer=None, **_) -> list[float | None]:
    answers = answer if answer is not None else [None] * len(completions)
    out = []
    for completion, ref in zip(completions, answers):
        if ref is None:
            out.append(None)
            continue
        ref_text = str(ref)
        ref_answer = final_answer(ref_text) if ("####" in ref_text or "\\boxed{" in ref_text) else ref_text
        out.append(1.0 if same_answer(final_answer(_text(completion)), ref_answer) else 0.0)
    return out


def think_format(prompts=None, completions=(), **_) -> list[float]:
    return [1.0 if _THINK.match(_text(c)) else 0.0 for c in completions]
