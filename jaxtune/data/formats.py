"""Records -> (token ids, loss weights). weights[i] = 1 means token i is a training target.

Chat goes through the tokenizer's own chat template (or the named `chatml` fallback). Which tokens
belong to an assistant turn is found by rendering: the text an assistant message adds after the
generation prompt of the conversation before it, i.e. its content *and* its end-of-turn marker, is
supervised. Tokenizing once with character offsets then maps those spans onto tokens.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import numpy as np

from jaxtune.errors import JaxtuneError

FORMATS = ("completion", "alpaca", "chat", "pretokenized")
OVERLONG = ("truncate", "drop", "split")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_KEYS = {"messages": ("role", "content"), "conversations": ("from", "value")}  # OpenAI, ShareGPT
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}
# End-of-turn markers of common templates; EOS is always one.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class FormatOptions:
    format: str = "chat"
    seq_len: int = 2048
    train_on_inputs: bool = False
    overlong: str = "truncate"  # truncate | drop | split
    chat_template: str | None = None  # None: the tokenizer's; "chatml": the fallback; else jinja text

    @classmethod
    def from_config(cls, cfg, **overrides) -> "FormatOptions":
        """The options of a run's config: an ml_collections ConfigDict, or the plain dict of a run's
        config.json (keys data.format, data.seq_len, data.train_on_inputs, data.overlong,
        data.chat_template, where '' means the tokenizer's template). `overrides` replace fields."""
        data = cfg["data"]
        values = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**values, "chat_template": values["chat_template"] or None, **overrides})

    def __post_init__(self):
        if self.format not in FORMATS:
            raise JaxtuneError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.overlong not in OVERLONG:
            raise JaxtuneError(f"data.overlong must be one of {OVERLONG}, got {self.overlong!r}")


@dataclasses.dataclass
class Tokenized:
    """Samples as one flat array with offsets: sample i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32
    weights: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len = samples + 1
    turn_ends_unlabelled: int = 0  # assistant turns whose end-of-turn token carries no label
    truncated: int = 0
    dropped: int = 0
    split: int = 0

    COUNTERS = ("turn_ends_unlabelled", "truncated", "dropped", "split")

    @classmethod
    def from_samples(cls, samples: list[tuple[np.ndarray, np.ndarray]], **counters) -> "Tokenized":
        lengths = np.array([len(ids) for ids, _ in samples], np.int64)
        ids = np.concatenate([s[0] for s in samples]) if samples else np.zeros(0, np.int32)
        weights = np.concatenate([s[1] for s in samples]) if samples else np.zeros(0, np.uint8)
        return cls(ids.astype(np.int32), weights.astype(np.uint8), np.concatenate([[0], np.cumsum(lengths)]), **counters)

    def counters(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in self.COUNTERS}

    def __len__(self):
        return len(self.offsets) - 1

    def sample(self, i):
        return self.ids[self.offsets[i]:self.offsets[i + 1]], self.weights[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@lru_cache(maxsize=8)
def _compile_template(source: str, origin: str):
    """Jinja as transformers sets it up (trim/lstrip blocks, raise_exception), compiled once. A syntax error
    names `origin`, since the user must know which template to fix."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise JaxtuneError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise JaxtuneError(f"{origin} is not valid Jinja: template line {e.lineno}: {e.message}; fix it, "
                           f"or use data.chat_template='chatml'") from None


def end_of_turn_ids(tokenizer) -> set[int]:
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Formatter:
    """Turns records of one format into token ids and loss weights with one tokenizer."""

    def __init__(self, tokenizer, opts: FormatOptions):
        self.tok, self.opts = tokenizer, opts
        if tokenizer.eos_token_id is None:
            raise JaxtuneError("the tokenizer has no EOS token: the model could never learn to stop. "
                               "Set eos_token in tokenizer_config.json.")
        template = opts.chat_template or getattr(tokenizer, "chat_template", None)
        origin = ("data.chat_template (--chat-template)" if opts.chat_template
                  else f"the chat template of the tokenizer in {tokenizer.name_or_path}")
        if opts.chat_template == "chatml" or (template is None and opts.format in ("chat", "alpaca")):
            template = CHATML
        self.template = _compile_template(template, origin) if template else None
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    # --- records -> (text, supervised character spans) -------------------------------------------
    def render(self, messages, add_generation_prompt=False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)

    @property
    def assistant_suffix(self) -> str | None:
        """What the template writes after an assistant's content (e.g. '<|im_end|>\\n'), found once by
        rendering a probe; None when the template does not wrap content verbatim. `_header` is what it
        writes before (the generation prompt, e.g. '<|im_start|>assistant\\n')."""
        if not hasattr(self, "_suffix"):
            probe = [{"role": "user", "content": "\x01probe-user\x01"}, {"role": "assistant", "content": "\x01probe\x01"}]
            prompt = self.render(probe[:1], add_generation_prompt=True)
            full = self.render(probe)
            body = full[len(prompt):] if full.startswith(prompt) else ""
            self._suffix = body[len("\x01probe\x01"):] if body.startswith("\x01probe\x01") else None
            user_only = self.render(probe[:1])
            self._header = prompt[len(user_only):] if prompt.startswith(user_only) else None
        return self._suffix

    def chat_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Full text plus the character spans of every assistant turn (content + end of turn).

        Fast path: one render, each message's content found in order, each assistant span checked to
        start right after the template's assistant header and end with its suffix (short content can
        also occur earlier, e.g. 'F' in a system prompt's 'Face'). Anything unexpected falls back to
        rendering every prefix (exact for any prefix-stable template, but quadratic in the number of turns)."""
        text, suffix = self.render(messages), self.assistant_suffix
        if suffix is not None and self._header is not None:
            spans, cursor = [], 0
            for msg in messages:
                at = text.find(msg["content"], cursor)
                if at < 0:
                    break
                cursor = at + len(msg["content"])
                if msg["role"] == "assistant":
                    if not (text.startswith(suffix, cursor) and text.startswith(self._header, at - len(self._header))):
                        break
                    spans.append((at, cursor + len(suffix)))
            else:
                return text, spans
        return text, self._chat_spans_by_prefix(messages)

    def _chat_spans_by_prefix(self, messages: list[dict]) -> list[tuple[int, int]]:
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not upto.startswith(prompt):
                raise JaxtuneError(
                    "chat template is not prefix-stable (rendering a conversation changes the text of its "
                    "earlier turns), so assistant turns cannot be located. Use data.chat_template='chatml' "
                    "or data.train_on_inputs=True.")
            spans.append((len(prompt), len(upto)))
        return spans

    def text_and_spans(self, record: dict, where: str) -> tuple[str, list[tuple[int, int]] | None]:
        """(text, spans) where spans=None means every token is supervised."""
        fmt = self.opts.format
        if fmt == "completion":
            return _string(record, "text", where), None
        if fmt == "alpaca":
            instruction, extra = _string(record, "instruction", where), record.get("input") or ""
            messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                        {"role": "assistant", "content": _string(record, "output", where)}]
        else:
            messages = chat_messages(record, where)
        try:
            text, spans = self.chat_spans(messages)
        except JaxtuneError as e:  # the template's raise_exception: say which record it refused
            raise JaxtuneError(f"{where}: {e}") from None
        return text, (None if self.opts.train_on_inputs else spans)

    # --- batch tokenization ----------------------------------------------------------------------
    def tokenize(self, records: list[dict], source: str = "records", wheres: list[str] | None = None) -> Tokenized:
        """`wheres[n]` names record n in errors (e.g. file:line); by default "`source` record n+1"."""
        wheres = wheres or [f"{source} record {n}" for n in range(1, len(records) + 1)]
        if self.opts.format == "pretokenized":
            samples = [_pretokenized(r, where) for r, where in zip(records, wheres)]
            return self._assemble(samples, turns=[None] * len(samples))
        texts, spans = [], []
        for record, where in zip(records, wheres):
            text, span = self.text_and_spans(record, where)
            texts.append(text)
            spans.append(span)
        completion = self.opts.format == "completion"
        enc = self.tok(texts, add_special_tokens=completion, return_offsets_mapping=True)
        samples = []
        for ids, offsets, span in zip(enc["input_ids"], enc["offset_mapping"], spans):
            ids = np.asarray(ids, np.int32)
            if completion:  # documents end with EOS, which is supervised so the model learns to stop
                ids = np.append(ids, np.int32(self.tok.eos_token_id))
                offsets = list(offsets) + [(len(ids), len(ids))]
            starts = np.fromiter((o[0] for o in offsets), np.int64, len(offsets))
            if span is None:
                weights = np.ones(len(ids), np.uint8)
                if completion and self.tok.bos_token_id is not None and len(ids) and ids[0] == self.tok.bos_token_id:
                    weights[0] = 0  # BOS is given, never predicted
            else:
                weights = np.zeros(len(ids), np.uint8)
                for lo, hi in span:
                    weights[(starts >= lo) & (starts < hi)] = 1
            samples.append((ids, weights))
        return self._assemble(samples, turns=[None if span is None else len(span) for span in spans])

    def _assemble(self, samples, turns) -> Tokenized:
        """Check end-of-turn labels (turns[n]: assistant turns of sample n, None = unchecked), apply
        the over-long policy, and flatten."""
        T = self.opts.seq_len
        out, truncated, dropped, split, unlabelled = [], 0, 0, 0, 0
        for n, (ids, weights) in enumerate(samples):
            if turns[n] is not None:
                unlabelled += self._unlabelled_turn_ends(ids, weights, turns[n])
            if len(ids) <= T:
                out.append((ids, weights))
            elif self.opts.overlong == "drop":
                dropped += 1
            elif self.opts.overlong == "truncate":
                truncated += 1
                out.append((ids[:T], weights[:T]))
            else:
                split += 1
                out.extend((ids[i:i + T], weights[i:i + T]) for i in range(0, len(ids), T) if weights[i:i + T].any())
        return Tokenized.from_samples(out, turn_ends_unlabelled=unlabelled, truncated=truncated, dropped=dropped,
                                      split=split)

    def _unlabelled_turn_ends(self, ids, weights, assistant_turns: int) -> int:
        """Assistant turns whose end-of-turn token is not a target. Each supervised run of tokens is
        one assistant turn; its end-of-turn token is the first one at or after the run's start."""
        is_eot = np.isin(ids, list(self.eot_ids))
        starts = np.flatnonzero(np.diff(np.concatenate([[0], weights.astype(np.int8)])) == 1)
        missing = max(assistant_turns - len(starts), 0)  # turns with no supervised token at all
        for s in starts:
            eots = np.flatnonzero(is_eot[s:])
            if not len(eots) or not weights[s + eots[0]]:
                missing += 1
        return missing


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise JaxtuneError(f"{where}: missing field {name!r} (has {sorted(record)}); map it with "
                           f"`jaxtune prepare --map {name}=COLUMN` or pick another data.format")
    return record[name]


def _bad_value(where: str, field: str, value, expected: str) -> JaxtuneError:
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return JaxtuneError(f"{where}: {field} is {shown[:100]}, expected {expected}; fix or remove that record")


def _string(record: dict, name: str, where: str) -> str:
    """A text field, checked here: a template or tokenizer given null or a number fails with a traceback."""
    value = _field(record, name, where)
    if not isinstance(value, str):
        raise _bad_value(where, name, value, "a string")
    return value


def chat_messages(record: dict, where: str) -> list[dict]:
    """OpenAI `messages` (role/content) or ShareGPT `conversations` (from/value) as role/content, checked
    so that a bad message is an error naming its field (messages[2].content), not a template traceback."""
    key = next((k for k in CHAT_KEYS if k in record), None)
    if key is None:
        raise JaxtuneError(f"{where}: a chat record needs 'messages' (role/content) or 'conversations' "
                           f"(from/value); it has {sorted(record)}")
    role_key, content_key = CHAT_KEYS[key]
    if not isinstance(record[key], list):
        raise _bad_value(where, key, record[key], "a list of messages")
    out = []
    for i, m in enumerate(record[key]):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise _bad_value(where, f"{key}[{i}]", m, f"an object with {role_key!r} and {content_key!r}")
        for name in (role_key, content_key):
            if not isinstance(m[name], str):
                raise _bad_value(where, f"{key}[{i}].{name}", m[name], "a string")
        role = m["role"] if key == "messages" else SHAREGPT_ROLES.get(m["from"].lower())
        if role is None:
            raise _bad_value(where, f"{key}[{i}].from", m["from"], f"one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": m[content_key]})
    return out


def _pretokenized(record: dict, where: str):
    ids = np.asarray(_field(record, "input_ids", where), np.int32)
    labels = record.get("labels")
    if labels is None:
        return ids, np.ones(len(ids), np.uint8)
    labels = np.asarray(labels)
    if labels.shape != ids.shape:
        raise JaxtuneError(f"{where}: labels has {labels.size} entries, input_ids {ids.size}")
    return ids, (labels != -100).astype(np.uint8)
