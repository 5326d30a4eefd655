"""Chat messages as the community writes them, normalised to the role/content form TRL renders.

Accepted per message: `role` (system, user, assistant, tool; sharegpt's names are mapped by the
caller), `content` as a string or a list of text parts, `tool_calls` (OpenAI's or TRL's form),
`tool_call_id` and `name` (tool results), `weight` (OpenAI's 0/1 per assistant turn, read by
the SFT converter). Any other key is counted in `ConvertOptions.ignored`, so the run can say
what it did not read.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from .problems import RowError

ROLES = ("system", "user", "assistant", "tool")
KEPT_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def _parts_text(parts: list, where: str) -> str:
    """The text of `content` given as parts (OpenAI's / TRL's multimodal form); only text parts fit."""
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
            value = part.get("text")
            if not isinstance(value, str):
                raise RowError(f"{where} content part {j}: a text part needs a string 'text'")
            texts.append(value)
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RowError(
                f"{where} content part {j} is of type {kind!r}: only text parts can be trained here "
                "(drop the other parts or the row)"
            )
    return "\n".join(texts)


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """`tool_calls` in the form chat templates read: [{type: function, function: {name, arguments}}]."""
    if not isinstance(calls, list) or not calls:
        raise RowError(f"{where}: 'tool_calls' must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(
                f"{where} tool call {j} must name its function: {{'function': {{'name': ..., 'arguments': ...}}}}"
            )
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI writes the arguments as a JSON string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise RowError(f"{where} tool call {j}: 'arguments' is not valid JSON ({err.msg})") from None
        if not isinstance(arguments, dict):
            raise RowError(f"{where} tool call {j}: 'arguments' must be an object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call, dict) and call.get("id"):
            entry["id"] = str(call["id"])
        out.append(entry)
    return out


def normalize(msgs: Any, key: str, ignored: Counter | None = None, keep_weight: bool = False) -> list[dict]:
    """Checks a list of messages and returns it in role/content form (new dicts).

    Args:
        msgs: the column's value.
        key: the column, as the file names it, for messages.
        ignored: counts message keys nothing reads (`messages.<key>`).
        keep_weight: keep each message's `weight` (0 or 1) for the caller.

    Raises:
        RowError: not a list of messages, an unknown role (named, with the valid ones), content
            that is not text, an empty user or assistant turn.
    """
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"column '{key}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"column '{key}' message {i}"
        if not isinstance(m, dict) or "role" not in m:
            raise RowError(f"{where} must be an object with 'role' and 'content'")
        role = m["role"]
        if role == "function":  # OpenAI's older name for a tool result
            role = "tool"
        if role not in ROLES:
            raise RowError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        calls = _tool_calls(m["tool_calls"], where) if m.get("tool_calls") else None
        if calls and role != "assistant":
            raise RowError(f"{where}: only assistant messages make tool calls (role is {role!r})")
        if isinstance(content, list):
            content = _parts_text(content, where)
        elif content is None and (calls or "content" in m):
            content = ""
        elif content is None:
            raise RowError(f"{where} must have 'content'")
        if not isinstance(content, str):
            raise RowError(f"{where}: content must be a string or a list of text parts")
        if role in ("user", "assistant") and not content.strip() and not calls:
            raise RowError(f"{where} ({role}) is empty")
        new: dict[str, Any] = {"role": role, "content": content}
        if calls:
            new["tool_calls"] = calls
        for extra in ("tool_call_id", "name"):
            if m.get(extra) is not None:
                new[extra] = str(m[extra])
        if "weight" in m:
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise RowError(f"{where}: 'weight' must be 0 or 1, got {m['weight']!r:.40}")
            if role != "assistant":
                raise RowError(f"{where}: 'weight' applies to assistant messages only (role is {role!r})")
            if keep_weight:
                new["weight"] = int(m["weight"])
            elif ignored is not None:  # weights mean something only to SFT conversations
                ignored[f"{key}[].weight"] += 1
        if ignored is not None:
            for extra in m:
                if extra not in KEPT_KEYS and extra != "weight" and m[extra] is not None:
                    ignored[f"{key}[].{extra}"] += 1
        out.append(new)
    return out


def contents(msgs: list[dict]) -> str:
    """Plain text of messages, for a model without a chat template."""
    return "\n".join(m["content"] for m in msgs)


def common_prefix(a: list[dict], b: list[dict]) -> int:
    """How many leading messages `a` and `b` share, ending before an assistant message that
    differs (TRL's `extract_prompt` rule), backed off so the shared part does not end with an
    assistant turn (that turn would be an answer, not part of the prompt)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n and a[n - 1]["role"] == "assistant":
        n -= 1
    return n


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def looks_like_hh(value: Any) -> bool:
    """Whether a string is an Anthropic HH-RLHF transcript (`\\n\\nHuman: ... \\n\\nAssistant: ...`)."""
    return isinstance(value, str) and value.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in value


def parse_hh(value: str, key: str) -> list[dict]:
    """An HH transcript as messages: `Human:` turns are the user's, `Assistant:` turns the assistant's."""
    text = value if value.startswith("\n\n") else "\n\n" + value.lstrip("\n")
    marks = list(_HH_TURN.finditer(text))
    msgs = []
    for j, mark in enumerate(marks):
        end = marks[j + 1].start() if j + 1 < len(marks) else len(text)
        role = "user" if mark.group(1) == "Human" else "assistant"
        msgs.append({"role": role, "content": text[mark.end() : end].strip()})
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError(f"column '{key}': an HH transcript must end with an 'Assistant:' turn")
    if not msgs[-1]["content"]:
        raise RowError(f"column '{key}': the last 'Assistant:' turn is empty")
    return msgs


# sharegpt `from` values (LLaMA-Factory's default tags) -> roles; function_call becomes an
# assistant tool call, observation a tool result.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}


def sharegpt_turns(
    turns: Any, key: str, tags: dict | None = None, role_key: str = "from", content_key: str = "value"
) -> list[dict]:
    """sharegpt turns ({from, value}) as messages; `tags` maps a dataset_info.json's own tag values.

    A `function_call` turn's value is the call as JSON (`{"name": ..., "arguments": {...}}` or a
    list of them) and becomes an assistant message with `tool_calls`.
    """
    roles = dict(SHAREGPT_ROLES)
    if tags:
        roles.update(tags)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column '{key}' must be a non-empty list of {{{role_key}, {content_key}}} turns")
    msgs = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and role_key not in turn and "role" in turn:
            # Turns written as {role, content} under `conversations` (Axolotl, OpenAI-style).
            turn = {**turn, role_key: turn["role"], content_key: turn.get("content")}
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise RowError(
                f"column '{key}' turn {i} must be {{'{role_key}': <role>, '{content_key}': <text>}}"
            )
        tag = turn.get(role_key)
        if tag not in roles:
            raise RowError(
                f"column '{key}' turn {i} has {role_key}={tag!r}; valid: {', '.join(sorted(roles))}"
            )
        role, value = roles[tag], turn[content_key]
        if role == "function_call":
            try:
                calls = json.loads(value)
            except json.JSONDecodeError as err:
                raise RowError(f"column '{key}' turn {i} (function_call) is not JSON ({err.msg})") from None
            calls = calls if isinstance(calls, list) else [calls]
            msgs.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": _tool_calls(calls, f"column '{key}' turn {i}"),
                }
            )
            continue
        if role in ("user", "assistant") and not value.strip():
            raise RowError(f"column '{key}' turn {i} ({tag}) is empty")
        msg = {"role": role, "content": value}
        if "weight" in turn:  # as OpenAI's per-message weight: 0 = context only
            if turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool) or role != "assistant":
                raise RowError(f"column '{key}' turn {i}: 'weight' must be 0 or 1, on an assistant turn")
            msg["weight"] = int(turn["weight"])
        msgs.append(msg)
    return msgs


def tools_json(value: Any, key: str = "tools") -> str | None:
    """A `tools` column as the JSON string TRL passes to the chat template (None when empty).

    A JSON string or a list; LLaMA-Factory's bare function schemas ({name, description,
    parameters}) are wrapped as {"type": "function", "function": ...}.
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(f"column '{key}' is not valid JSON ({err.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError(f"column '{key}' must be a list of tool (function) schemas")
    out = []
    for j, tool in enumerate(value):
        fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"column '{key}' tool {j} must be a function schema with a 'name'")
        out.append({"type": "function", "function": fn})
    return json.dumps(out, ensure_ascii=False)
