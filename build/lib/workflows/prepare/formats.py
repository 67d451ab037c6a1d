"""Prompt formats: a raw record in, token ids and labels out (pure Python, no Ray).

Three steps, each with one job:

1. `canonical_example(record, data)` validates one record against the format and the field
   mapping and returns a canonical dict (or raises `RowError` with a reason code):
   instruction `{instruction, input, output}`, completion `{prompt, completion}`,
   chat `{messages: [{role, content}]}`, text `{text}`, classification `{text, label}`.
2. `render_segments(example, ...)` lays it out as text segments, each trained or not. Chat-
   templated formats find the assistant spans by rendering growing prefixes of the conversation:
   SmolLM2's template has no `{% generation %}` block, so `return_assistant_tokens_mask` would
   silently return all zeros.
3. `ExampleEncoder.encode_causal` tokenizes the joined text once per example (a batched fast-
   tokenizer call) and labels each token by the segment its last character falls in. Working on
   character offsets instead of tokenizing segments separately keeps the ids those of the whole
   rendered conversation: BPE merges across a segment seam are not split apart.

Label invariants (causal LM): `labels[i]` is `input_ids[i]` or -100; the unmasked labels of a
response decode to exactly the response text + the end-of-turn token, once. For templates that
end each turn with a special token (SmolLM2's `<|im_end|>`, also its EOS) that token is trained;
otherwise EOS is appended. Padding never appears here (rows are unpadded).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
# Default column names per format role; `data.fields` overrides any of them.
DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "output": "output", "prompt": "prompt",
                  "completion": "completion", "messages": "messages", "text": "text", "label": "label"}
REJECT_REASONS = ("invalid_utf8", "not_json", "not_an_object", "malformed_csv", "missing_field", "empty_field",
                  "wrong_type", "unknown_role", "no_assistant_turn", "too_long", "template_mismatch")


class RowError(ValueError):
    """One record that cannot become a training example. `reason` is a code from
    `REJECT_REASONS` (counted in the manifest); `detail` says which field and why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- 1. validation

def parse_record(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid_utf8", f"byte {e.start} is not valid UTF-8") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("not_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    return record


def _text(record: Mapping[str, Any], fields: Mapping[str, str], role: str, required: bool = True) -> str:
    column = fields.get(role, DEFAULT_FIELDS[role])
    if column not in record or record[column] is None:
        if required:
            raise RowError("missing_field", f"no {column!r} field (format role {role!r}; "
                           f"the record has {sorted(record)[:8]})")
        return ""
    value = record[column]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{column!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError("empty_field", f"{column!r} is empty")
    return value


def _messages(record: Mapping[str, Any], fields: Mapping[str, str], system_prompt: str | None) -> list[dict]:
    column = fields.get("messages", DEFAULT_FIELDS["messages"])
    if column not in record or record[column] is None:
        raise RowError("missing_field", f"no {column!r} field (format role 'messages')")
    turns = record[column]
    if not isinstance(turns, list):
        raise RowError("wrong_type", f"{column!r} must be a list of {{role, content}}, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise RowError("wrong_type", f"{column}[{i}] must be an object with a string 'role'")
        if turn["role"] not in ROLES:
            raise RowError("unknown_role", f"{column}[{i}].role is {turn['role']!r}; allowed: {', '.join(ROLES)}")
        content = turn.get("content")
        if not isinstance(content, str):
            raise RowError("wrong_type" if content is not None else "missing_field",
                           f"{column}[{i}].content must be a string")
        if not content.strip():
            raise RowError("empty_field", f"{column}[{i}].content is empty")
        messages.append({"role": turn["role"], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant_turn", f"{column!r} has no assistant turn to learn from")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def canonical_example(record: Mapping[str, Any], fmt: str, fields: Mapping[str, str],
                      system_prompt: str | None = None) -> dict[str, Any]:
    """Validate a parsed record and keep only what the format uses (raises RowError)."""
    if fmt == "instruction":
        return {"instruction": _text(record, fields, "instruction"), "input": _text(record, fields, "input", False),
                "output": _text(record, fields, "output"), "system": system_prompt}
    if fmt == "completion":
        return {"prompt": _text(record, fields, "prompt"), "completion": _text(record, fields, "completion")}
    if fmt == "chat":
        return {"messages": _messages(record, fields, system_prompt)}
    if fmt == "text":
        return {"text": _text(record, fields, "text")}
    if fmt == "classification":
        column = fields.get("label", DEFAULT_FIELDS["label"])
        label = record.get(column)
        if label is None:
            raise RowError("missing_field", f"no {column!r} field (format role 'label')")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise RowError("wrong_type", f"{column!r} must be a string or an integer, got {type(label).__name__}")
        if not str(label).strip():
            raise RowError("empty_field", f"{column!r} is empty")
        return {"text": _text(record, fields, "text"), "label": str(label).strip()}
    raise ValueError(f"unknown data.format {fmt!r}")


def example_id(example: Mapping[str, Any]) -> str:
    """A stable content hash (16 hex chars): same content, same id, on any machine."""
    return hashlib.sha256(json.dumps(example, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def reference_text(example: Mapping[str, Any]) -> str:
    """The raw expected response (what evaluation compares generations with)."""
    if "messages" in example:
        return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant")
    return example.get("output", example.get("completion", example.get("text", "")))


# ----------------------------------------------------------------------------- 2. rendering

@dataclass
class Segment:
    """A piece of the rendered example. `append_eos`: an EOS token follows it (trained too)."""

    text: str
    trained: bool
    append_eos: bool = False


def _chat_segments(messages: list[dict], tokenizer: Any) -> list[Segment]:
    """Assistant spans by rendering growing prefixes: the text between the prefix rendered with
    the generation prompt and the prefix including the turn is that turn's content (+ the
    template's end-of-turn token)."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    segments, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, turn = render(messages[:i], True), render(messages[: i + 1], False)
        start, content = len(head), message["content"]
        if not (full.startswith(turn) and turn.startswith(head) and start >= done):
            raise RowError("template_mismatch", "the chat template does not render conversations "
                                                "prefix-stably; cannot locate assistant turns")
        if not turn.startswith(content, start):
            raise RowError("template_mismatch", f"the chat template rewrites assistant turn {i}'s content")
        end = start + len(content)
        end_of_turn = next((s for s in specials if turn.startswith(s, end)), None)
        segments.append(Segment(full[done:start], False))
        if end_of_turn:
            segments.append(Segment(full[start:end + len(end_of_turn)], True))
            done = end + len(end_of_turn)
        else:
            segments.append(Segment(content, True, append_eos=True))
            done = end
    segments.append(Segment(full[done:], False))
    return segments


def _plain_segments(example: Mapping[str, Any]) -> list[Segment]:
    """The `template: plain` layout (also the fallback when a tokenizer has no chat template)."""
    if "messages" in example:
        segments = []
        for m in example["messages"]:
            header = f"### {m['role'].capitalize()}:\n"
            if m["role"] == "assistant":
                segments += [Segment(header, False), Segment(m["content"], True, append_eos=True), Segment("\n\n", False)]
            else:
                segments.append(Segment(header + m["content"] + "\n\n", False))
        return segments
    prompt = f"{example['system']}\n\n" if example.get("system") else ""
    prompt += f"### Instruction:\n{example['instruction']}\n\n"
    if example.get("input"):
        prompt += f"### Input:\n{example['input']}\n\n"
    return [Segment(prompt + "### Response:\n", False), Segment(example["output"], True, append_eos=True)]


def render_segments(example: Mapping[str, Any], fmt: str, tokenizer: Any, use_chat_template: bool) -> list[Segment]:
    if fmt == "completion":
        return [Segment(example["prompt"], False), Segment(example["completion"], True, append_eos=True)]
    if fmt == "text":
        return [Segment(example["text"], True, append_eos=True)]
    if not use_chat_template:
        return _plain_segments(example)
    if fmt == "instruction":
        user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
        messages = ([{"role": "system", "content": example["system"]}] if example.get("system") else [])
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": example["output"]}]
        return _chat_segments(messages, tokenizer)
    return _chat_segments(example["messages"], tokenizer)


# ----------------------------------------------------------------------------- 3. tokenizing

@dataclass
class Encoded:
    """One tokenized causal-LM example (unpadded). `prompt_len`: tokens before the last trained
    response, i.e. where generation starts for evaluation."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool = False


class ExampleEncoder:
    """Turns canonical examples into token ids + labels with one tokenizer (built by the caller)."""

    def __init__(self, tokenizer: Any, fmt: str, max_seq_len: int, template: str = "auto",
                 truncate: bool = True, train_on_inputs: bool = False):
        self.tok, self.fmt, self.max_seq_len = tokenizer, fmt, max_seq_len
        self.truncate, self.train_on_inputs = truncate, train_on_inputs
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_template:
            raise ValueError(f"data.template is 'chat' but tokenizer {tokenizer.name_or_path!r} has no chat "
                             "template; use template: plain (or auto)")
        self.use_chat_template = has_template and template != "plain"
        if tokenizer.eos_token_id is None and fmt != "classification":
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end responses with")

    def encode_causal(self, examples: list[Mapping[str, Any]]) -> list[Encoded | RowError]:
        """Batch-encode; each result is an `Encoded` or the `RowError` that rejects that example."""
        rendered: list[list[Segment] | RowError] = []
        for ex in examples:
            try:
                rendered.append(render_segments(ex, self.fmt, self.tok, self.use_chat_template))
            except RowError as e:
                rendered.append(e)
        texts = ["".join(s.text for s in r) if isinstance(r, list) else "" for r in rendered]
        # A chat template already emits every special token it wants; plain text gets the
        # tokenizer's own BOS (if it adds one).
        enc = self.tok(texts, add_special_tokens=not self.use_chat_template or self.fmt in ("completion", "text"),
                       return_offsets_mapping=True, return_attention_mask=False)
        return [r if isinstance(r, RowError) else self._label(r, ids, offsets)
                for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"])]

    def _label(self, segments: list[Segment], ids: list[int], offsets: list[tuple[int, int]]) -> Encoded | RowError:
        starts, pos = [], 0
        for s in segments:
            starts.append(pos)
            pos += len(s.text)
        # Each token belongs to the segment of its *last* character (monotonic in t). A token that
        # BPE merged across a seam (a template's trailing space + the response's first word) is
        # thus trained: every response character is learned, at the cost of that one template char.
        owner = [max(bisect.bisect_right(starts, max(hi - 1, lo)) - 1, 0) for lo, hi in offsets]
        input_ids: list[int] = []
        labels: list[int] = []
        prompt_len, t = 0, 0
        for index, s in enumerate(segments):
            if s.trained:
                prompt_len = len(input_ids)
            trained = s.trained or self.train_on_inputs
            while t < len(ids) and owner[t] <= index:
                input_ids.append(ids[t])
                # Zero-width tokens (a BOS the tokenizer adds) carry no text to learn.
                labels.append(ids[t] if trained and offsets[t][1] > offsets[t][0] else IGNORE_INDEX)
                t += 1
            if s.append_eos:
                input_ids.append(self.tok.eos_token_id)
                labels.append(self.tok.eos_token_id)
        return self._truncate(Encoded(input_ids, labels, prompt_len))

    def _truncate(self, enc: Encoded) -> Encoded | RowError:
        n = len(enc.input_ids)
        if n <= self.max_seq_len:
            return enc
        if not self.truncate:
            return RowError("too_long", f"{n} tokens > max_seq_len {self.max_seq_len} (data.truncate is off)")
        labels = enc.labels[: self.max_seq_len]
        if all(lab == IGNORE_INDEX for lab in labels):
            return RowError("too_long", f"{n} tokens; nothing to learn within max_seq_len {self.max_seq_len} "
                                        "(the prompt fills it)")
        return Encoded(enc.input_ids[: self.max_seq_len], labels, min(enc.prompt_len, self.max_seq_len), True)

    def encode_classification(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids (with the tokenizer's special tokens, truncated to max_seq_len) and whether
        each text was truncated. Over-long texts are rejected instead when truncation is off."""
        enc = self.tok(texts, return_attention_mask=False)
        ids = enc["input_ids"]
        truncated = [len(x) > self.max_seq_len for x in ids]
        if self.truncate:
            ids = [x if not t else x[: self.max_seq_len - 1] + x[-1:] for x, t in zip(ids, truncated)]
        return ids, truncated
