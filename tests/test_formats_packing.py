"""Formats -> tokens/weights on the real SmolLM2 tokenizer and template, packing properties, preflight."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxtune import JaxtuneError
from jaxtune.data import packing
from jaxtune.data.formats import CHATML, Formatter, FormatOptions, Tokenized
from jaxtune.data.preflight import DataReport, debug_view


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def supervised_text(tokenizer, data: Tokenized, i=0):
    ids, w = data.sample(i)
    return tokenizer.decode(ids[w == 1])


CONVO = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]}


def test_chat_supervises_assistant_turns_and_their_end_of_turn(tokenizer):
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=512)).tokenize([CONVO])
    assert supervised_text(tokenizer, data) == "Hello! How can I help?<|im_end|>\nNo.<|im_end|>\n"
    assert data.turn_ends_unlabelled == 0
    full = tokenizer.decode(data.sample(0)[0])
    assert full.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_a_tokenizer_without_chatml_tokens_gets_chatml_ending_turns_with_eos(sentencepiece_like_tokenizer):
    """Llama 2 / Mistral base: no template, no <|im_end|> token. jaxtune's ChatML ends each turn with EOS (a
    token generation stops at, and one the preflight sees supervised) and starts with BOS as the model's
    pretraining did; the template it says it uses is the one transformers renders to the same tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sentencepiece_like_tokenizer)
    formatter = Formatter(tok, FormatOptions("chat", seq_len=512))
    assert formatter.template_is_fallback
    assert "turns end with EOS '</s>', as <|im_end|> is not a token" in formatter.template_note
    assert "text starts with BOS '<s>'" in formatter.template_note
    data = formatter.tokenize([CONVO])
    assert data.turn_ends_unlabelled == 0
    ids, weights = data.sample(0)
    assert ids[0] == tok.bos_token_id and (ids == tok.eos_token_id).sum() == 4
    assert tok.decode(ids[weights == 1]) == "Hello! How can I help?</s>\nNo.</s>\n"
    tok.chat_template = formatter.template_source
    assert list(ids) == list(tok.apply_chat_template(CONVO["messages"], tokenize=True, return_dict=True)["input_ids"])
    explicit = Formatter(tok, FormatOptions("chat", chat_template="chatml"))
    assert not explicit.template_is_fallback and explicit.template_source == formatter.template_source


def test_train_on_inputs_supervises_everything(tokenizer):
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=512, train_on_inputs=True)).tokenize([CONVO])
    assert data.weights.all()


def test_sharegpt_alpaca_completion_pretokenized(tokenizer):
    share = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! How can I help?"},
                               {"from": "human", "value": "Tell me a joke"}, {"from": "gpt", "value": "No."}]}
    f = Formatter(tokenizer, FormatOptions("chat", seq_len=512))
    np.testing.assert_array_equal(f.tokenize([share]).ids, f.tokenize([CONVO]).ids)

    alpaca = Formatter(tokenizer, FormatOptions("alpaca", seq_len=512)).tokenize(
        [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}])
    assert supervised_text(tokenizer, alpaca) == "5<|im_end|>\n"
    assert "Add the numbers.\n\n2 and 3" in tokenizer.decode(alpaca.ids)

    comp = Formatter(tokenizer, FormatOptions("completion", seq_len=512)).tokenize([{"text": "Once upon a time"}])
    assert comp.ids[-1] == tokenizer.eos_token_id and comp.weights.all()
    assert tokenizer.decode(comp.ids) == "Once upon a time<|im_end|>"

    pre = Formatter(tokenizer, FormatOptions("pretokenized", seq_len=512)).tokenize(
        [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}])
    assert pre.weights.tolist() == [0, 0, 1, 1]


def test_overlong_policies(tokenizer):
    long = {"text": " ".join(["word"] * 300)}
    for policy, expect in [("truncate", (1, 0, 0)), ("drop", (0, 1, 0)), ("split", (5, 0, 1))]:
        data = Formatter(tokenizer, FormatOptions("completion", seq_len=64, overlong=policy)).tokenize([long])
        assert (len(data), data.dropped, data.split) == expect, policy
        assert data.lengths.max(initial=0) <= 64
    assert Formatter(tokenizer, FormatOptions("completion", seq_len=64)).tokenize([long]).truncated == 1


def test_missing_field_names_field_and_record(tokenizer):
    with pytest.raises(JaxtuneError, match=r"train.jsonl record 2: missing field 'output'"):
        Formatter(tokenizer, FormatOptions("alpaca")).tokenize(
            [{"instruction": "a", "output": "b"}, {"instruction": "c"}], "train.jsonl")
    with pytest.raises(JaxtuneError, match=r"needs 'messages'"):
        Formatter(tokenizer, FormatOptions("chat")).tokenize([{"text": "x"}])


@pytest.mark.parametrize("fmt, record, message", [
    ("chat", {"messages": [*CONVO["messages"][:2], {"role": "user", "content": None}]},
     "messages[2].content is null, expected a string"),
    ("chat", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content is 42, expected a string"),
    ("chat", {"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role is 1, expected a string"),
    ("chat", {"messages": ["hi"]}, "messages[0] is \"hi\", expected an object with 'role' and 'content'"),
    ("chat", {"messages": "hi"}, "messages is \"hi\", expected a list of messages"),
    ("chat", {"conversations": [{"from": "human", "value": None}]}, "conversations[0].value is null"),
    ("chat", {"conversations": [{"from": "robot", "value": "hi"}]},
     'conversations[0].from is "robot", expected one of'),
    ("alpaca", {"instruction": "Add.", "output": 5}, "output is 5, expected a string"),
    ("completion", {"text": None}, "text is null, expected a string"),
])
def test_bad_field_types_name_record_and_field(tokenizer, fmt, record, message):
    with pytest.raises(JaxtuneError) as e:
        Formatter(tokenizer, FormatOptions(fmt)).tokenize(
            [{"text": "ok", "instruction": "Say hi.", "output": "hi", **CONVO}, record], "d.jsonl",
            ["d.jsonl:1", "d.jsonl:3"])
    assert str(e.value).startswith(f"d.jsonl:3: {message}") and "\n" not in str(e.value)


def test_template_syntax_error_names_where_it_came_from(tokenizer):
    with pytest.raises(JaxtuneError) as e:
        Formatter(tokenizer, FormatOptions("chat", chat_template="{% for m in messages %}\n{{ m['content'] }"))
    assert str(e.value).startswith("data.chat_template (--chat-template) is not valid Jinja: template line 2: "
                                   "unexpected '}'")

    class BrokenTemplate:
        eos_token_id, name_or_path, chat_template = 2, "models/broken", "{% for m in messages %}{{ m }}"

    with pytest.raises(JaxtuneError, match=r"^the chat template of the tokenizer in models/broken is not valid "
                                           r"Jinja: template line 1: Unexpected end of template.*'endfor'"):
        Formatter(BrokenTemplate(), FormatOptions("chat"))


def test_template_raise_exception_names_the_record(tokenizer):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first turn must be from the user') }}"
                "{% endif %}") + CHATML
    with pytest.raises(JaxtuneError, match=r"^d.jsonl record 2: chat template: the first turn must be from the user"):
        Formatter(tokenizer, FormatOptions("chat", chat_template=template)).tokenize(
            [CONVO, {"messages": CONVO["messages"][1:]}], "d.jsonl")


def test_template_that_masks_end_of_turn_fails_preflight(tokenizer):
    # A template that closes each turn at the start of the *next* one: the assistant's <|im_end|>
    # lands in the following user header and is never a target.
    bad = ("{% for m in messages %}{% if not loop.first %}{{ '<|im_end|>\n' }}{% endif %}"
           "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_end|>\n<|im_start|>assistant\n' }}{% endif %}")
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=512, chat_template=bad)).tokenize([CONVO])
    assert data.turn_ends_unlabelled == 2
    report = DataReport.build(data, packing.pack(data, 512), 512)
    with pytest.raises(JaxtuneError, match=r"2 assistant turn\(s\) end with an end-of-turn token that carries no label"):
        report.check()


def test_no_supervised_tokens_and_no_eos_fail(tokenizer):
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=512)).tokenize(
        [{"messages": [{"role": "user", "content": "hello?"}]}])
    report = DataReport.build(data, packing.pack(data, 512), 512)
    with pytest.raises(JaxtuneError, match="no supervised token at all"):
        report.check()

    class NoEos:
        eos_token_id = None

    with pytest.raises(JaxtuneError, match="no EOS token"):
        Formatter(NoEos(), FormatOptions("completion"))


def test_chatml_fallback_and_debug_view(tokenizer):
    f = Formatter(tokenizer, FormatOptions("chat", seq_len=512, chat_template="chatml"))
    data = f.tokenize([CONVO])
    assert tokenizer.decode(data.ids).startswith("<|im_start|>user\nHi there<|im_end|>")
    view = debug_view(tokenizer, *data.sample(0))
    assert "+       2 '<|im_end|>'" in view and "-       1 '<|im_start|>'" in view and "-    4093 'user'" in view


def test_report_text(tokenizer):
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=128)).tokenize([CONVO] * 5)
    report = DataReport.build(data, packing.pack(data, 128), 128)
    assert report.samples == 5 and report.supervised_tokens == int(data.weights.sum()) - 0
    assert "packed into" in report.text() and "efficiency" in report.text()


# --- properties -----------------------------------------------------------------------------------

docs = st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=40), min_size=1, max_size=30)


@given(weight_lists=docs, seq_len=st.integers(40, 100))
@settings(max_examples=200, deadline=None)
def test_packing_never_crosses_a_boundary(weight_lists, seq_len):
    rng = np.random.default_rng(len(weight_lists))
    samples = [(rng.integers(3, 1000, len(w)).astype(np.int32), np.array(w, np.uint8)) for w in weight_lists]
    lengths = np.array([len(s[0]) for s in samples])
    data = Tokenized(np.concatenate([s[0] for s in samples]), np.concatenate([s[1] for s in samples]),
                     np.concatenate([[0], np.cumsum(lengths)]))
    rows = packing.pack(data, seq_len)
    recovered = []
    for r in range(len(rows["tokens"])):
        seg, pos, tok = rows["segment_ids"][r], rows["positions"][r], rows["tokens"][r]
        tgt, w = rows["targets"][r], rows["weights"][r]
        n_real = int((seg > 0).sum())
        assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all()  # padding only at the end
        assert (w[n_real:] == 0).all()
        for s in np.unique(seg[:n_real]):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()  # contiguous
            assert pos[where].tolist() == list(range(len(where)))  # positions restart
            assert w[where[-1]] == 0  # the last token predicts nothing across the boundary
            inner = where[:-1]
            assert (tgt[inner] == tok[inner + 1]).all()  # targets stay inside the document
            recovered.append(tok[where].tolist())
    assert sorted(recovered) == sorted(s[0].tolist() for s in samples)
    assert rows["weights"].sum() == sum(int(s[1][1:].sum()) for s in samples)


text = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=30).map(str.strip).filter(
    lambda s: s and "<|" not in s)


@given(turns=st.lists(st.tuples(text, text), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_weights_are_exactly_assistant_turns_plus_end_of_turn(tokenizer, turns):
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=4096)).tokenize([{"messages": messages}])
    assert supervised_text(tokenizer, data) == "".join(a + "<|im_end|>\n" for _, a in turns)
    assert data.turn_ends_unlabelled == 0
    # and the fast span finder agrees with rendering every prefix
    f = Formatter(tokenizer, FormatOptions("chat"))
    assert f.chat_spans(messages)[1] == f._chat_spans_by_prefix(messages)
    # tokens located from the bytes each stands for (no offsets) as by the Rust tokenizer's character offsets
    f._token_bytes = None
    by_offsets = f.tokenize([{"messages": messages}])
    assert f._token_bytes is None and len(data.ids) == len(by_offsets.ids)
    np.testing.assert_array_equal(data.weights, by_offsets.weights)


def test_best_fit_decreasing_is_tight():
    bins = packing.best_fit_decreasing(np.array([60, 40, 50, 50, 30, 70]), 100)
    assert sorted(sorted(b) for b in bins) == [[0, 1], [2, 3], [4, 5]]


def test_format_options_from_a_config_or_its_json():
    import json

    from jaxtune.config import base_config

    cfg = base_config()
    cfg.data.format, cfg.data.seq_len, cfg.data.overlong = "alpaca", 512, "split"
    expected = FormatOptions("alpaca", 512, train_on_inputs=False, overlong="split", chat_template=None)
    assert FormatOptions.from_config(cfg) == expected  # '' is the tokenizer's template
    assert FormatOptions.from_config(json.loads(json.dumps(cfg.to_dict()))) == expected  # as in config.json
    assert FormatOptions.from_config(cfg, seq_len=96, overlong="truncate") == FormatOptions("alpaca", 96)
    cfg.data.chat_template = "chatml"
    assert FormatOptions.from_config(cfg).chat_template == "chatml"


def test_short_turns_found_in_the_system_prompt_are_not_mistaken(tokenizer):
    """Hypothesis found it: SmolLM2's default system prompt ends in 'Hugging Face', so a user turn 'F' was
    found there, the assistant's 'F' at the user's turn, and the user's text supervised."""
    messages = [{"role": "user", "content": "F"}, {"role": "assistant", "content": "F"}]
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=4096)).tokenize([{"messages": messages}])
    assert supervised_text(tokenizer, data) == "F<|im_end|>\n"
    f = Formatter(tokenizer, FormatOptions("chat"))
    assert f.chat_spans(messages)[1] == f._chat_spans_by_prefix(messages)


def test_special_token_text_inside_messages_stays_text(tokenizer, sentencepiece_like_tokenizer):
    """'<|im_end|>' written in a message must not end the turn (nor '<|im_start|>' open one): it is
    encoded as the characters it is, as split_special_tokens does, and counted in the report. A tokenizer
    that cannot encode it in place refuses the record by name instead."""
    from transformers import AutoTokenizer

    user = "How do I end a turn in ChatML? With <|im_end|>, right?"
    answer = "Yes: write <|im_end|> then<|im_start|>user for the next."
    record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    data = Formatter(tokenizer, FormatOptions("chat", seq_len=512)).tokenize([record, CONVO])
    ids, weights = data.sample(0)
    im_end, im_start = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert (ids == im_end).sum() == 3 and (ids == im_start).sum() == 3  # the template's: system, user, assistant
    assert data.special_text_kept == 3
    assert supervised_text(tokenizer, data) == answer + "<|im_end|>\n"
    assert tokenizer.decode(ids) == Formatter(tokenizer, FormatOptions("chat")).render(record["messages"])
    literal = tokenizer(" <|im_end|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert any(list(ids[i:i + len(literal)]) == literal for i in range(len(ids)))
    plain = Formatter(tokenizer, FormatOptions("chat", seq_len=512)).tokenize([CONVO])
    assert plain.special_text_kept == 0 and np.array_equal(plain.ids, data.sample(1)[0])
    report = DataReport.build(data, packing.pack(data, 512), 512)
    assert "encoded as plain text, not as the token: 3" in report.text()

    llama_like = AutoTokenizer.from_pretrained(sentencepiece_like_tokenizer)
    scraped = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x</s>y"}]}
    with pytest.raises(JaxtuneError, match=r"^d.jsonl:7: message 2 holds '</s>', the text of a special token"):
        Formatter(llama_like, FormatOptions("chat")).tokenize([scraped], wheres=["d.jsonl:7"])
