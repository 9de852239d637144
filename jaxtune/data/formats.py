"""Records -> (token ids, loss weights). weights[i] = 1 means token i is a training target.

Chat goes through the tokenizer's own chat template (or the named `chatml` fallback). Which tokens
belong to an assistant turn is found by rendering: the text an assistant message adds after the
generation prompt of the conversation before it, i.e. its content *and* its end-of-turn marker, is
supervised. Tokenizing once with character offsets then maps those spans onto tokens.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from functools import cached_property, lru_cache

import numpy as np

from jaxtune.errors import JaxtuneError

FORMATS = ("completion", "alpaca", "chat", "pretokenized")
OVERLONG = ("truncate", "drop", "split")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"
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
    special_text_kept: int = 0  # special-token texts inside message content, encoded as plain text
    key: str | None = None  # the token cache's key (data, tokenizer, options) where it was loaded from one

    COUNTERS = ("turn_ends_unlabelled", "truncated", "dropped", "split", "special_text_kept")

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

    @cached_property
    def target_counts(self) -> np.ndarray:
        """Supervised targets per sample (weights after each sample's first token: a packed row predicts
        token t+1 from t), summed a block of samples at a time: no int64 copy of every weight is made."""
        counts = np.zeros(len(self), np.int64)
        for a in range(0, len(self), 1 << 16):
            b = min(a + (1 << 16), len(self))
            starts = self.offsets[a:b] - self.offsets[a]
            weights = np.asarray(self.weights[self.offsets[a]:self.offsets[b]], np.int64)
            filled = starts < np.append(starts[1:], len(weights))  # reduceat cannot sum an empty sample
            if filled.any():
                counts[a:b][filled] = np.add.reduceat(weights, starts[filled]) - weights[starts[filled]]
        return counts

    def select(self, index: np.ndarray, **counters) -> "Selection":
        return Selection(self, np.asarray(index, np.int64), **counters)


class Selection:
    """Some samples of a Tokenized, by number, sharing its arrays (a memory map stays on disk): what
    `split_validation` hands out, so holding out validation copies no tokens. `ids`, `weights` and
    `offsets` are built when asked (small data, tests); training reads `sample(i)` and `lengths`."""

    COUNTERS = Tokenized.COUNTERS
    counters = Tokenized.counters

    def __init__(self, base: Tokenized, index: np.ndarray, **counters):
        self.base, self.index = base, index
        for name in self.COUNTERS:
            setattr(self, name, counters.get(name, 0))

    def __len__(self):
        return len(self.index)

    def sample(self, i):
        return self.base.sample(self.index[i])

    @property
    def lengths(self) -> np.ndarray:
        return self.base.lengths[self.index]

    @property
    def target_counts(self) -> np.ndarray:
        return self.base.target_counts[self.index]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([self.sample(i)[0] for i in range(len(self))] or [np.zeros(0, np.int32)])

    @property
    def weights(self) -> np.ndarray:
        return np.concatenate([self.sample(i)[1] for i in range(len(self))] or [np.zeros(0, np.uint8)])


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
        template = env.from_string(source)
    except TemplateSyntaxError as e:
        raise JaxtuneError(f"{origin} is not valid Jinja: template line {e.lineno}: {e.message}; fix it, "
                           f"or use data.chat_template='chatml'") from None
    template.globals = dict(template.globals)  # a ChainMap is merged key by key on every render: 20% of its time
    return template


def chatml(tokenizer) -> tuple[str, str]:
    """jaxtune's ChatML for this tokenizer, and what it adapted. A turn ends with <|im_end|> where that is a
    token of the vocabulary, else with the tokenizer's EOS (as unsloth maps it), so that the model learns
    to end its turn with a token generation stops at; text starts with BOS where the tokenizer puts one in
    front of text (Llama, Mistral), as the model saw in pretraining."""
    notes, source = [], CHATML
    if CHATML_END not in tokenizer.get_vocab():
        source = source.replace(f"'{CHATML_END}\n'", "eos_token + '\n'")
        notes.append(f"turns end with EOS {tokenizer.eos_token!r}, as {CHATML_END} is not a token of this tokenizer")
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("x")["input_ids"][:1] == [bos]:
        source = "{{ bos_token }}" + source
        notes.append(f"text starts with BOS {tokenizer.bos_token!r}")
    return source, "".join(f"; {n}" for n in notes)


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
        self.template_source, self.template_note, self.template_is_fallback = self._choose_template()
        origin = ("data.chat_template (--chat-template)" if opts.chat_template
                  else f"the chat template of the tokenizer in {tokenizer.name_or_path}")
        self.template = _compile_template(self.template_source, origin) if self.template_source else None
        self.eot_ids = end_of_turn_ids(tokenizer)
        self._is_eot = np.zeros(max(len(tokenizer), *self.eot_ids) + 1, bool)  # a lookup per token id
        self._is_eot[list(self.eot_ids)] = True
        self.specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def _choose_template(self) -> tuple[str | None, str, bool]:
        """(Jinja source, what to tell the user, whether jaxtune chose it because the tokenizer has none).
        The source is what the run trains on, so it is also what an export writes into its tokenizer files."""
        opts, own = self.opts, getattr(self.tok, "chat_template", None)
        if opts.format not in ("chat", "alpaca"):
            return None, f"none (data.format={opts.format!r} trains on the text as it is)", False
        if opts.chat_template == "chatml":
            source, note = chatml(self.tok)
            return source, f"ChatML, as data.chat_template='chatml' asks{note}", False
        if opts.chat_template:
            return opts.chat_template, "the Jinja template in data.chat_template", False
        if own:
            return own, f"the tokenizer's own (from {self.tok.name_or_path})", False
        source, note = chatml(self.tok)
        return source, (f"ChatML, because the tokenizer in {self.tok.name_or_path} has none{note}; exports carry "
                        "it. Set data.chat_template to the model family's template to use another"), True

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

    def text_and_spans(self, record: dict, where: str) -> tuple[str, list[tuple[int, int]] | None, list]:
        """(text, spans, literal) where spans=None means every token is supervised and `literal` are the
        character ranges of special-token text inside message content, to be encoded as plain text."""
        fmt = self.opts.format
        if fmt == "completion":  # the text is the document as the user formatted it: its special tokens stay
            return _string(record, "text", where), None, []
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
        return text, (None if self.opts.train_on_inputs else spans), self._literal_ranges(text, messages, where)

    # --- special-token text inside content stays text -------------------------------------------------
    @cached_property
    def _special_text(self):
        """A regex of the special tokens' texts (longest first), or None."""
        decoder = getattr(self.tok, "added_tokens_decoder", {})
        texts = sorted({t.content for t in decoder.values() if t.special}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    def _literal_ranges(self, text: str, messages: list[dict], where: str) -> list[tuple[int, int]]:
        """Where message content holds the text of a special token ('<|im_end|>' in a message about chat
        formats, a scraped '</s>'): those characters are encoded as the text they are, as transformers'
        split_special_tokens does, so data can neither end a turn early nor inject a control token. A
        preceding space goes with them (byte-level BPE writes ' <|' as one token)."""
        if self._special_text is None or not any(self._special_text.search(m["content"]) for m in messages):
            return []
        if not self._pieces_encode_exactly:
            hit = next(m for m in messages if self._special_text.search(m["content"]))
            raise JaxtuneError(
                f"{where}: message {messages.index(hit) + 1} holds {self._special_text.search(hit['content'])[0]!r}, "
                f"the text of a special token of this tokenizer; it would be trained as that token, and this "
                f"tokenizer (it puts a space in front of every piece it encodes) cannot encode it as plain text in "
                f"place: remove or rewrite it in the record")
        ranges, cursor = [], 0
        for i, msg in enumerate(messages):
            at = text.find(msg["content"], cursor)
            if at < 0:
                raise JaxtuneError(f"{where}: message {i + 1} holds the text of a special token, and the chat "
                                   f"template does not write the content as it is, so it cannot be kept as plain "
                                   f"text: remove it from the record")
            for m in self._special_text.finditer(msg["content"]):
                lo = at + m.start()
                ranges.append((lo - (lo > at and text[lo - 1] == " "), at + m.end()))
            cursor = at + len(msg["content"])
        return ranges

    @cached_property
    def _pieces_encode_exactly(self) -> bool:
        """Whether encoding text in pieces gives the tokens of encoding it whole at a letter/punctuation
        boundary: true for byte-level BPE (Llama 3, SmolLM, Qwen), false where each piece gets a leading
        space (SentencePiece's Llama 2 and Mistral tokenizers)."""
        ids = lambda t: self.tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        return ids("a!") == ids("a") + ids("!")

    def _encode_keeping_text(self, text: str, literal: list[tuple[int, int]]) -> tuple[list[int], list]:
        """Token ids and character offsets of `text`, its `literal` ranges encoded as plain text."""
        ids, offsets, pos = [], [], 0
        for lo, hi in [*literal, (len(text), len(text))]:
            for a, b, as_text in ((pos, lo, False), (lo, hi, True)):
                if a < b:
                    enc = self.tok(text[a:b], add_special_tokens=False, split_special_tokens=as_text,
                                   return_offsets_mapping=True)
                    ids += enc["input_ids"]
                    offsets += [(start + a, end + a) for start, end in enc["offset_mapping"]]
            pos = hi
        return ids, offsets

    # --- batch tokenization ----------------------------------------------------------------------
    PART = 1024  # records rendered while the part before them is encoded (in Rust, without the GIL)

    def tokenize(self, records: list[dict], source: str = "records", wheres: list[str] | None = None) -> Tokenized:
        """`wheres[n]` names record n in errors (e.g. file:line); by default "`source` record n+1". Parts of
        the records are rendered (Python) while the part before is encoded by the Rust tokenizer in a
        thread; with tokens located from their bytes and labels set per part, 16k chat records took 2.2 s
        instead of 3.2 s on 2 cores."""
        wheres = wheres or [f"{source} record {n}" for n in range(1, len(records) + 1)]
        if self.opts.format == "pretokenized":
            samples = [_pretokenized(r, where) for r, where in zip(records, wheres)]
            return self._assemble(samples, turns=[None] * len(samples))
        completion = self.opts.format == "completion"
        if self._special_text is not None:
            self._pieces_encode_exactly  # noqa: B018 -- asked of the tokenizer now: not while the thread encodes
        if getattr(self.tok, "backend_tokenizer", None) is not None:  # set here, before the thread encodes:
            self.tok.backend_tokenizer.encode_special_tokens = False  # special-token text is the token
        samples, turns, deferred, pending = [], [], [], None
        for a in range(0, len(records) + self.PART, self.PART):
            rendered = None
            if a < len(records):
                rendered = [self.text_and_spans(r, where) for r, where in zip(records[a:a + self.PART],
                                                                               wheres[a:a + self.PART])]
                encoding = self._encoder.submit(self._encode, [text for text, _, _ in rendered], completion,
                                                locate=self._locate)
            if pending is not None:
                self._label(*pending, samples, turns, deferred)
            pending = rendered and (rendered, encoding)
        for n, text, span, literal in deferred:  # encoded in pieces once no encoding runs in the thread
            samples[n] = self._labelled(*self._encode_keeping_text(text, literal), text, span)
        data = self._assemble(samples, turns)
        data.special_text_kept = sum(len(literal) for *_, literal in deferred)
        return data

    @property
    def _locate(self) -> bool:
        """Whether tokens must be located in the text: to label assistant spans."""
        return not (self.opts.format == "completion" or self.opts.train_on_inputs)

    @cached_property
    def _encoder(self):
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(1, thread_name_prefix="jaxtune-encode")

    def _label(self, rendered: list, encoding, samples: list, turns: list, deferred: list) -> None:
        """Each record's (ids, weights) appended to `samples`, its assistant turns to `turns`; a record with
        special-token text in its messages goes to `deferred` (its place in `samples`, text, spans, ranges)."""
        part_ids, part_located = encoding.result()
        if part_located is None:
            part_located = (self._starts_by_bytes(part_ids, [text for text, _, _ in rendered]) if self._locate
                            else [None] * len(part_ids))
        for ids, located, (text, span, literal) in zip(part_ids, part_located, rendered):
            if literal:
                deferred.append((len(samples), text, span, literal))
            samples.append(self._labelled(ids, located, text, span) if not literal else None)
            turns.append(None if span is None else len(span))

    def _labelled(self, ids, located, text: str, span) -> tuple[np.ndarray, np.ndarray]:
        completion = self.opts.format == "completion"
        ids = np.asarray(ids, np.int32)
        if completion:  # documents end with EOS, which is supervised so the model learns to stop
            ids = np.append(ids, np.int32(self.tok.eos_token_id))
        if span is None:
            weights = np.ones(len(ids), np.uint8)
            if completion and self.tok.bos_token_id is not None and len(ids) and ids[0] == self.tok.bos_token_id:
                weights[0] = 0  # BOS is given, never predicted
        else:  # the tokens that start inside an assistant span
            weights = np.zeros(len(ids), np.uint8)
            first_at = _first_token_at(located, len(text), len(ids))
            for lo, hi in span:
                weights[first_at(lo):first_at(hi)] = 1
        return ids, weights

    def _encode(self, texts: list[str], add_special_tokens: bool, locate: bool = True) -> tuple[list, list]:
        """Token ids of each text, and (`locate`) where its tokens start: the Rust Encodings to ask, character
        offsets, or None — a byte-level BPE tokenizer encodes without offsets (a third less time) and the
        starts are summed from the bytes each token stands for (`_starts_by_bytes`). One parallel batch call
        into the Rust tokenizer; run in the encoding thread, so it changes no tokenizer setting."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            enc = self.tok(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]
        if locate and self._token_bytes is None:
            encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            return [e.ids for e in encodings], encodings
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        return ids, None  # located later (`_starts_by_bytes`), outside this thread: numpy holds the GIL

    def _starts_by_bytes(self, ids: list[list[int]], texts: list[str]) -> list:
        """Where each text's tokens start (characters), from the bytes each token stands for, summed over the
        whole part at once; a text whose tokens do not add up to it (a tokenizer that puts a space in front)
        is encoded again with offsets."""
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        nbytes = self._token_bytes[np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))]
        starts = np.cumsum(nbytes) - nbytes
        first = np.concatenate([[0], np.cumsum(lengths)])
        out = []
        for n, text in enumerate(texts):
            a, b = first[n], first[n + 1]
            encoded = text.encode()
            if int(nbytes[a:b].sum()) != len(encoded):
                out.append(self.tok.backend_tokenizer.encode(text, add_special_tokens=False))
                continue
            local = starts[a:b] - (starts[a] if b > a else 0)
            if len(encoded) != len(text):  # not ASCII: byte starts to character starts (UTF-8 lead bytes)
                local = (np.cumsum((np.frombuffer(encoded, np.uint8) & 0xC0) != 0x80) - 1)[local]
            out.append(local)
        return out

    @cached_property
    def _token_bytes(self) -> np.ndarray | None:
        """The bytes of text each token id stands for, where a table says it: byte-level BPE (GPT-2's alphabet,
        one character per byte) with no normalizer, as SmolLM, Llama 3 and Qwen have; None otherwise."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if (backend is None or backend.normalizer is not None or type(backend.decoder).__name__ != "ByteLevel"
                or not hasattr(backend, "encode_batch_fast")):
            return None
        vocab = backend.get_vocab(with_added_tokens=True)
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        table = np.zeros(max(vocab.values()) + 1, np.int64)
        for token, i in vocab.items():
            table[i] = len(token.encode()) if token in added else len(token)
        return table

    def _assemble(self, samples, turns) -> Tokenized:
        """Check end-of-turn labels (turns[n]: assistant turns of sample n, None = unchecked), apply
        the over-long policy, and flatten."""
        T = self.opts.seq_len
        out, truncated, dropped, split = [], 0, 0, 0
        unlabelled = self._unlabelled_turn_ends([s for s, t in zip(samples, turns) if t is not None],
                                                [t for t in turns if t is not None])
        for ids, weights in samples:
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

    def _unlabelled_turn_ends(self, samples: list, assistant_turns: list[int]) -> int:
        """Assistant turns whose end-of-turn token is not a target, over all `samples` at once. Each supervised
        run of tokens is one assistant turn; its end-of-turn token is the first one at or after the run's
        start, in the same sample."""
        data = Tokenized.from_samples(samples)
        ids, supervised = data.ids, data.weights.astype(bool)
        follows = np.concatenate([[False], supervised[:-1]])
        follows[data.offsets[:-1][data.lengths > 0]] = False  # a run starts afresh in each sample
        run_starts = np.flatnonzero(supervised & ~follows)
        sample_of_run = np.searchsorted(data.offsets, run_starts, "right") - 1
        eot_at = np.where(self._is_eot[ids], np.arange(len(ids)), len(ids))
        next_eot = np.minimum.accumulate(eot_at[::-1])[::-1][run_starts]  # the first end of turn from each start
        in_sample = next_eot < data.offsets[1:][sample_of_run]
        labelled = in_sample & supervised[np.minimum(next_eot, max(len(ids) - 1, 0))]
        runs = np.bincount(sample_of_run, minlength=len(samples))
        without_supervised = np.maximum(np.asarray(assistant_turns, np.int64) - runs, 0).sum()  # no token at all
        return int(without_supervised + (~labelled).sum())


def _first_token_at(located, text_length: int, n_tokens: int):
    """first_at(c): the index of the first token that starts at or after character c (n_tokens if none), from
    an array of token starts, a Rust Encoding (one lookup per character asked) or a list of (start, end)
    offsets."""
    if isinstance(located, np.ndarray):
        return lambda c: int(np.searchsorted(located, c, "left"))
    if isinstance(located, list):
        starts = np.array(located, np.int64).reshape(-1, 2)[:, 0]
        return lambda c: int(np.argmax(starts >= c)) if (starts >= c).any() else n_tokens

    def first_at(c: int) -> int:
        t = located.char_to_token(c) if c < text_length else None
        if t is None:  # past the text, or a character no token covers: ask every token
            return _first_token_at(located.offsets, text_length, n_tokens)(c) if c < text_length else n_tokens
        return t if located.token_to_chars(t)[0] >= c else t + 1

    return first_at


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
