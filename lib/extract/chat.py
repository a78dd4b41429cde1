"""Conversations -> token sequences through the tokenizer's chat template, and the positions
whose predicted token lies in the messages of chosen roles.

The sequence is exactly `tokenizer.apply_chat_template(messages, tokenize=True)`: the rendered
text tokenized with the template's own special tokens and no others. With `roles`, a token is
scored when it overlaps the content of a message of those roles, or the text the template
closes that message with (up to where the rendering of the conversation up to that message
ends: `<|im_end|>\\n` in ChatML, `<|eot_id|>` in Llama 3). The content is found by rendering
a marker in its place. The header before it (`<|im_start|>assistant\\n`) is not scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.errors import UserError

# A value of input.chat_template holding one of these is a template; anything else is a path.
_TEMPLATE_MARKS = ("{{", "{%")
# Rendered in place of a message's content to find where the template puts it: the text before
# it is the real rendering's (the searched content may also occur in a header or a closing tag).
_MARK = "\ue000"  # a private-use character: in no template and, in practice, in no message


@dataclass
class Conversation:
    """One row's templated tokens (cut at max_length), the token indices that are scored (None:
    all) and the UTF-8 bytes of the text they cover."""

    ids: list[int]
    scored: list[int] | None
    n_bytes: int
    truncated: bool


def template_text(value: str | None) -> str | None:
    """input.chat_template as template text: the value itself, or the file it names."""
    if value is None or any(mark in value for mark in _TEMPLATE_MARKS):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"config key input.chat_template: {value} is neither a template (no {{{{ or {{%) "
            f"nor a readable file: {exc.strerror or exc}"
        ) from None


def check(tokenizer, template: str | None, roles: list[str] | None, is_seq2seq: bool) -> None:
    """Refuse what cannot score conversations: a seq2seq model, a tokenizer without a chat
    template, a template that does not compile, roles without character offsets."""
    if is_seq2seq:
        raise UserError(
            "config key input.messages_column: conversations are scored with causal models; "
            "this model is seq2seq"
        )
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "config key input.messages_column: the tokenizer has no chat template; "
            "give one with input.chat_template (a template or a file)"
        )
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, chat_template=template
        )
    except Exception as exc:  # noqa: BLE001 - a syntax error is Jinja's; a template may raise
        if type(exc).__name__ == "TemplateSyntaxError":
            raise UserError(f"input.chat_template does not compile: {exc}") from None
    if roles is not None and not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "config key input.score_roles: needs a fast tokenizer (character offsets); "
            f"{type(tokenizer).__name__} is not one"
        )


def parse(value) -> list[dict] | str:
    """A row's messages as dicts, or the reason it has none that can be scored."""
    if value is None:
        return "null_messages"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return "invalid_messages"
    if not isinstance(value, list):
        return "invalid_messages"
    if not value:
        return "empty_messages"
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return "invalid_messages"
        # Arrow structs give absent fields as None; the template should not see them.
        messages.append({key: item for key, item in message.items() if item is not None})
    return messages


def _render(tokenizer, messages: list[dict], template: str | None) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except Exception:  # noqa: BLE001 - the template's own checks (roles must alternate, ...)
        return None


def _marked(
    tokenizer, messages: list[dict], i: int, template: str | None, rendered: str
) -> tuple[int, str]:
    """Where message i's content (or its stripped text, for templates that trim) begins in
    `rendered`, found by rendering a marker in its place; (-1, "") when the content is not there
    verbatim or the marker is not rendered exactly once."""
    content = messages[i]["content"]
    trial = _render(
        tokenizer, [*messages[:i], {**messages[i], "content": _MARK}, *messages[i + 1 :]], template
    )
    if trial is None or trial.count(_MARK) != 1:
        return -1, ""
    at = trial.index(_MARK)
    for text in (content, content.strip()):
        if rendered.startswith(text, at):
            return at, text
    return -1, ""


def _searched(rendered: str, content: str, cursor: int, closed_at: int | None) -> tuple[int, str]:
    """Where the content (or its stripped text) occurs after `cursor`: the last occurrence
    before `closed_at`, where the message's own rendering ends (a system prompt the template adds
    may hold the same words earlier), else the first; (-1, "") when it does not."""
    for text in (content, content.strip()):
        if closed_at is None:
            found = rendered.find(text, cursor)
        else:
            found = rendered.rfind(text, cursor, closed_at)
        if found >= 0:
            return found, text
    return -1, ""


def _closed(
    tokenizer, prefix: str | None, rendered: str, end: int, tokens: list[int], offsets: list
) -> int:
    """Where the text that closes a message whose content ends at `end` ends: where the rendering
    of the conversation up to that message ends, or, when that rendering is not a prefix of the
    whole (a template that writes its end-of-sequence token only after the last message), the
    end of the tokens the two renderings share."""
    if prefix is None:
        return end
    if rendered.startswith(prefix):
        return max(end, len(prefix))
    if prefix[:end] != rendered[:end]:
        return end
    own = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(own), len(tokens)) and own[shared] == tokens[shared]:
        shared += 1
    return max(end, offsets[shared - 1][1]) if shared else end


def _spans(
    tokenizer,
    messages: list[dict],
    rendered: str,
    template: str | None,
    roles: set[str],
    encoded: tuple[list[int], list],
) -> list[tuple[int, int]] | None:
    """Character spans of the scored messages' content and closing text; None when a scored
    message's content is not found verbatim in the rendering."""
    tokens, offsets = encoded  # the rendering's tokens and their character offsets
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        scored = message["role"] in roles
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            if scored and content:  # content parts, not text: nothing to locate
                return None
            continue
        # The rendering up to this message ends where the template closes it.
        prefix = _render(tokenizer, messages[: i + 1], template) if scored else None
        closes = prefix is not None and rendered.startswith(prefix)
        found, text = _marked(tokenizer, messages, i, template, rendered) if scored else (-1, "")
        if found < 0:
            found, text = _searched(rendered, content, cursor, len(prefix) if closes else None)
        if found < 0:
            if scored:
                return None
            continue
        end = found + len(text)
        if scored:
            spans.append((found, _closed(tokenizer, prefix, rendered, end, tokens, offsets)))
        cursor = end
    return spans


def _covered(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the tokens whose character range overlaps a span."""
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    ends = np.array([e for _, e in offsets], dtype=np.int64)
    hit = np.zeros(len(offsets), dtype=bool)
    for begin, end in spans:
        hit |= (starts < end) & (ends > begin)
    return np.flatnonzero(hit).tolist()


def tokenize(
    values: list,
    tokenizer,
    template: str | None,
    roles: list[str] | None,
    max_length: int,
) -> list[Conversation | str]:
    """Each row's Conversation, or the reason it is skipped."""
    out: list[Conversation | str] = []
    rendered_rows, where, messages_of = [], [], []
    for value in values:
        messages = parse(value)
        rendered = None if isinstance(messages, str) else _render(tokenizer, messages, template)
        if isinstance(messages, str):
            out.append(messages)
        elif rendered is None:
            out.append("template_error")
        else:
            out.append("")  # filled below
            where.append(len(out) - 1)
            rendered_rows.append(rendered)
            messages_of.append(messages)
    if not rendered_rows:
        return out
    encoded = tokenizer(
        rendered_rows,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        return_offsets_mapping=roles is not None,
    )
    wanted = set(roles or ())
    for i, row in enumerate(where):
        ids, rendered = encoded["input_ids"][i], rendered_rows[i]
        kept = ids[:max_length]
        if roles is None:
            out[row] = Conversation(kept, None, len(rendered.encode()), len(ids) > max_length)
            continue
        offsets = encoded["offset_mapping"][i]
        spans = _spans(tokenizer, messages_of[i], rendered, template, wanted, (ids, offsets))
        if spans is None:
            out[row] = "unlocated_content"
            continue
        scored = [t for t in _covered(offsets, spans) if t < len(kept)]
        n_bytes = sum(len(rendered[a:b].encode()) for a, b in spans)
        out[row] = Conversation(kept, scored, n_bytes, len(ids) > max_length)
    return out
