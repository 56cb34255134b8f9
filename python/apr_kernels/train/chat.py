"""Supervised fine-tuning records: which tokens are loss targets.

JSON Lines records (``data.py``) may hold, instead of a plain text field:

* ``{"prompt": str, "completion": str}``: the text is prompt + completion; only the completion and
  the end-of-text id after it are targets (the model learns to answer and to stop);
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: the
  conversation rendered by the model's own chat template when its tokenizer carries one
  (``tokenizer.chat_template``, kept by ``convert`` from Hugging Face and GGUF files, or aprender's
  typed ``chat_template``; rendered with jinja2 as ``transformers``' ``apply_chat_template`` does,
  default system prompts included), else in the format of the model family told by the file's typed
  ``chat_format`` or the tokenizer's special tokens: ChatML for Qwen2
  (``<|im_start|>{role}\\n{content}<|im_end|>\\n``), the Llama 3 header format
  (``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``, after
  ``<|begin_of_text|>``; no system message is added), or for SentencePiece models with ``<s>``/``</s>``
  (Llama 2, Mistral base models ship no template) the Llama 2 chat format
  (``<s>[INST] {user} [/INST] {answer} </s>``, a system message in ``<<SYS>>`` blocks before the
  first user message, contents stripped, as Llama-2-chat's template renders it). Only each assistant
  message's content and the special token that closes it (``<|im_end|>`` / ``<|eot_id|>`` / ``</s>``)
  are targets.

ShareGPT records (``{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}``, the
other common export of chat data sets) are read as ``messages`` (``normalised``: the keys renamed
as TRL's ``maybe_convert_to_chatml`` renames them, and the roles ``human`` / ``gpt`` as ``user`` /
``assistant``), in every message-list field.

``render`` gives the text and its target spans (character ranges); ``encode_with_targets`` tokenises
the whole text as Hugging Face's ``apply_chat_template`` + tokenize would (template tokens and
special-token strings recognised) and marks a token as a target when its first byte lies in a span.
The data pipeline stores non-target tokens as ``-1 - id`` in its int32 stream (``data.py``), so one
tensor carries ids and the loss mask through the cache, the sharding and the batching.
"""

from __future__ import annotations

import unicodedata

CHATML = ("<|im_start|>", "<|im_end|>")
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA2 = ("<s>", "</s>")
ROLES = ("system", "user", "assistant")


# ShareGPT's roles, as the tools that read it map them (others pass through, then are checked)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")


def normalised(record):
    """``record`` with ShareGPT's form read as ours (module docstring): ``conversations`` becomes
    ``messages``, and in each message-list field ``{"from", "value"}`` becomes ``{"role", "content"}``;
    and Alpaca's form (``alpaca_messages``) becomes ``messages``. Anything else is returned as it is."""
    if not isinstance(record, dict):
        return record
    if "instruction" in record and "output" in record and not ("messages" in record or "prompt" in record):
        return alpaca_messages(record)
    if "conversations" in record and "messages" not in record:
        record = {("messages" if k == "conversations" else k): v for k, v in record.items()}
    out = None
    for key in MESSAGE_FIELDS:
        value = record.get(key)
        if isinstance(value, list) and any(isinstance(m, dict) and ("from" in m or "value" in m) for m in value):
            out = out or dict(record)
            out[key] = [_chatml_message(m) for m in value]
    return out or record


ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


def alpaca_messages(record: dict) -> dict:
    """An Alpaca record (``{"instruction", "input", "output"}``, optionally ``system`` and ``history``,
    a list of earlier ``[user, assistant]`` turns) as a conversation, as LLaMA-Factory reads the
    format: the user's turn is the instruction, then a newline and the input when there is one; the
    answer is the output. Other fields stay."""
    instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise ValueError(f"an Alpaca record's instruction, input and output must be strings; got "
                         f"{[type(v).__name__ for v in (instruction, extra, output)]}")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for turn in record.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ValueError(f"an Alpaca record's history must be a list of [user, assistant] string pairs; got "
                             f"{turn!r}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages += [{"role": "user", "content": instruction + ("\n" + extra if extra else "")},
                 {"role": "assistant", "content": output}]
    return {"messages": messages, **{k: v for k, v in record.items() if k not in ALPACA_FIELDS}}


def _chatml_message(m):
    if not isinstance(m, dict):
        return m
    m = {("role" if k == "from" else "content" if k == "value" else k): v for k, v in m.items()}
    if m.get("role") in SHAREGPT_ROLES:
        m["role"] = SHAREGPT_ROLES[m["role"]]
    return m


def implicit_prompt(record: dict) -> dict:
    """A preference record with its prompt: as given, or (none, or of another format than the answers:
    TRL's ``maybe_extract_prompt``) the longest common prefix of ``chosen`` and ``rejected``, characters
    of texts or messages of conversations, with a space before the first difference left to the
    answers, as TRL's ``extract_prompt`` splits them."""
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is not None and isinstance(prompt, list) == isinstance(chosen, list):
        return record
    if isinstance(chosen, list) != isinstance(rejected, list):
        return record  # (the answer reader names the mismatch)
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), max(n - 1, 0))
    if idx < n and chosen[idx] != rejected[idx] and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1  # the space before the answers stays with them
    return {**record, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def is_supervised(record) -> bool:
    return isinstance(record, dict) and ("messages" in record or "prompt" in record)


def chat_format(tokenizer) -> str:
    """'chatml', 'llama3' or 'llama2': the file's typed ``chat_format`` when it names one of these
    and the tokenizer has its special tokens, else the first whose special tokens it has; ValueError
    if none fits."""
    special = getattr(tokenizer, "special_tokens", {}) or {}
    formats = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2}
    named = (getattr(tokenizer, "extra", None) or {}).get("chat_format")
    for fmt in ([named] if named in formats else []) + list(formats):
        if all(t in special for t in formats[fmt]):
            return fmt
    told = (f"; its chat_format {named!r} is not one rendered here (chatml, llama3, llama2)"
            if named and named not in formats else "")
    raise ValueError(f"chat records need a chat template (tokenizer.chat_template) or a tokenizer with ChatML "
                     f"({', '.join(CHATML)}), Llama 3 ({', '.join(LLAMA3)}) or Llama 2 ({', '.join(LLAMA2)}) "
                     f"special tokens; this one has none of these{told}")


def render(record: dict, tokenizer, where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, target character spans, whether the end-of-text id after the text is a target).
    Texts are NFC-normalised first when the tokenizer normalises (so spans stay where encode sees them)."""
    nfc = (lambda s: unicodedata.normalize("NFC", s)) if getattr(tokenizer, "nfc", False) else (lambda s: s)
    if "messages" in record:
        template = chat_template(tokenizer)
        if template is not None:
            messages = _checked_messages(record["messages"], where, nfc)
            text = render_template(template, messages, tokenizer, False, where)
            return text, _assistant_spans(text, messages, tokenizer, where), False
        try:
            fmt = chat_format(tokenizer)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return _render_messages(record["messages"], fmt, where, nfc)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(f"{where}: a prompt/completion record needs string fields 'prompt' and "
                         f"'completion'; got fields {sorted(record)[:6]}")
    prompt, completion = nfc(prompt), nfc(completion)
    return prompt + completion, [(len(prompt), len(prompt) + len(completion))], True


def _checked_messages(messages, where: str, nfc) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': "
                             f"str}}; got {m!r:.120}")
        out.append({"role": role, "content": nfc(content)})
    return out


def chat_template(tokenizer) -> str | None:
    """The model's own jinja chat template (``tokenizer.chat_template`` metadata, or aprender's typed
    ``chat_template`` key: ``metadata.tokenizer_carried``), if any."""
    t = (getattr(tokenizer, "extra", None) or {}).get("tokenizer.chat_template")
    return t if isinstance(t, str) and t.strip() else None


def render_template(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool, where: str) -> str:
    """``template`` rendered as ``transformers``' ``apply_chat_template(tokenize=False)`` does, with
    the bos/eos token strings, in the bounded sandbox of ``chat_template``; any failure of the template
    (jinja's, a limit's, or Python's: a division by zero, a type error, recursion) is one ValueError
    naming ``where``."""
    import jinja2

    from .chat_template import render

    names = {}
    for key, ident in (("bos_token", getattr(tokenizer, "bos_id", None)), ("eos_token", getattr(tokenizer, "eos_id", None))):
        if ident is not None:
            names[key] = tokenizer.token_bytes(ident).decode("utf-8", errors="replace")
    # the template gets copies: jinja's indent filter extends a list given to it in place (`s += "\n"`),
    # past the immutable sandbox, and the caller reads the messages again after the render
    copies = [dict(m) if isinstance(m, dict) else m for m in messages]
    try:
        return render(template, messages=copies, add_generation_prompt=add_generation_prompt, **names)
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"{where}: the model's chat template failed on this record ({exc})") from None
    except Exception as exc:  # noqa: BLE001  (whatever the template's own operations raise)
        raise ValueError(f"{where}: the model's chat template failed on this record ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None


def _assistant_spans(text: str, messages: list[dict], tokenizer, where: str) -> list[tuple[int, int]]:
    """Where each assistant message's content appears in the rendered ``text`` (in order), extended
    over the special token that follows it (the one closing the turn), spaces between included."""
    specials = sorted(getattr(tokenizer, "special_tokens", {}) or {}, key=len, reverse=True)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = text.find(m["content"], cursor)
        if start < 0:
            raise ValueError(f"{where}: the chat template does not show messages[{i}] (assistant) verbatim; "
                             f"its tokens cannot be marked as targets")
        end = start + len(m["content"])
        after = len(text) - len(text[end:].lstrip(" "))  # Llama 2's template puts " " before </s>
        end = next((after + len(s) for s in specials if text.startswith(s, after)), end)
        spans.append((start, end))
        cursor = end
    return spans


def _render_llama2(messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """Llama 2 chat: ``<s>[INST] {user} [/INST] {answer} </s>`` per exchange (Meta's format and the
    Llama-2-chat template: an optional system message wrapped in ``<<SYS>>`` before the first user
    message, user and assistant alternating, contents stripped)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"{where}: the Llama 2 chat format needs user and assistant messages alternating "
                             f"(after an optional system message); message {i + (system is not None)} is "
                             f"{m['role']!r}, expected {want!r}")
        content = m["content"]
        if want == "user":
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            piece = f"<s>[INST] {content.strip()} [/INST]"
        else:
            piece = f" {content.strip()} </s>"
            spans.append((pos + 1, pos + len(piece)))  # the answer, the space and the </s> closing it
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans, False


def _render_messages(messages, fmt: str, where: str, nfc) -> tuple[str, list[tuple[int, int]], bool]:
    messages = _checked_messages(messages, where, nfc)
    if fmt == "llama2":
        return _render_llama2(messages, where)
    parts: list[str] = ["<|begin_of_text|>"] if fmt == "llama3" else []
    spans: list[tuple[int, int]] = []
    pos = len(parts[0]) if parts else 0
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if fmt == "chatml":
            head, close, tail = f"<|im_start|>{role}\n", "<|im_end|>", "\n"
        else:
            head, close, tail = f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ""
        start = pos + len(head)
        end = start + len(content) + len(close)  # the content and the token that closes it
        if role == "assistant":
            spans.append((start, end))
        parts.append(head + content + close + tail)
        pos = end + len(tail)
    return "".join(parts), spans, False


def generation_prompt(messages: list[dict], tokenizer) -> tuple[str, int]:
    """``messages`` rendered as for training, followed by the header of the assistant's turn: the text
    to continue, and the id of the token that closes the answer (where generation stops)."""
    template = chat_template(tokenizer)
    if template is not None:
        text = render_template(template, _checked_messages(messages, "generate", lambda s: s), tokenizer, True,
                               "generate")
        special = getattr(tokenizer, "special_tokens", {}) or {}
        close = special.get("<|im_end|>", special.get("<|eot_id|>", getattr(tokenizer, "eos_id", None)))
        return text, close
    fmt = chat_format(tokenizer)
    text, _, _ = _render_messages(messages, fmt, "generate", lambda s: s)
    if fmt == "chatml":
        return text + "<|im_start|>assistant\n", tokenizer.special_tokens["<|im_end|>"]
    if fmt == "llama2":  # the text ends with " [/INST]": the answer follows
        return text, tokenizer.special_tokens["</s>"]
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n", tokenizer.special_tokens["<|eot_id|>"]


def encode_with_targets(tokenizer, text: str, spans: list[tuple[int, int]],
                        where: str = "chat") -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (special tokens recognised) and, per token, whether it is a target."""
    ids, offsets = tokenizer.encode_with_offsets(text, special=True)
    # character spans -> byte spans (token boundaries are byte offsets)
    byte = len(text.encode("utf-8"))
    byte_spans = [(len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))) for a, b in spans]
    if offsets[-1] != byte:
        raise ValueError(f"{where}: the tokens of the rendered record cover {offsets[-1]} bytes, the text "
                         f"{byte}; the tokenizer does not round-trip this text")
    # a token is a target when it holds text of an answer: SentencePiece tokens carry the space
    # before a word, so the answer's first token starts before the answer does
    targets = [any(start < b and end > a for a, b in byte_spans) for start, end in zip(offsets, offsets[1:])]
    return ids, targets
