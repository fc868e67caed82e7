"""Calibration corpus: the shipped chats load and share no text with what emq evaluates on; user JSONL
in each accepted shape loads; bad input fails with one EmqError naming file and line; packing gives
exactly samples x seq_len ids, deterministically per seed."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from importlib import resources

import pytest
import yaml

from emq import calibration as C
from emq.errors import EmqError

# --- the shipped corpus ----------------------------------------------------------------------------


def _contents(chats: C.Chats) -> list[str]:
    return [m["content"] for s in chats.samples for m in s]  # the shipped corpus holds chats only


def test_shipped_corpus_loads():
    chats = C.load_chats("default")
    assert chats.name == "default"
    assert len(chats.samples) >= 80
    assert sum(len(t) for t in _contents(chats)) >= 50_000
    assert all(isinstance(s, list) and s[-1]["role"] == "assistant" for s in chats.samples)
    assert len(chats.lines) == len(chats.samples)
    assert chats.sha256 == hashlib.sha256(open(chats.path, "rb").read()).hexdigest()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())  # case and punctuation normalized


def _ngrams(texts: list[str], n: int = 8) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for t in texts:
        w = _words(t)
        out.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return out


def _sentences(texts: list[str]) -> set[str]:
    # sentences of four words or more: shorter ones ("Thank you.") are not text worth protecting
    return {" ".join(_words(s)) for t in texts for s in re.split(r"(?<=[.!?])\s+|\n+", t) if len(_words(s)) >= 4}


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _held_out() -> dict[str, list[str]]:
    """Text emq scores or trains on: the fidelity corpus, the eval questions, the demo's data."""
    from emq.demo.data import doctor_examples, judge_examples

    pkg = resources.files("emq")
    out = {"fidelity_data/default.yaml": _strings(yaml.safe_load((pkg / "fidelity_data" / "default.yaml").read_text()))}
    for f in (pkg / "questions").iterdir():
        if f.name.endswith(".yaml"):
            out[f"questions/{f.name}"] = _strings(yaml.safe_load(f.read_text()))
    out["demo/data.py"] = _strings([doctor_examples("good"), doctor_examples("bad"), judge_examples()])
    return out


def test_shipped_corpus_shares_no_text_with_fidelity_questions_or_demo():
    ours = _contents(C.load_chats("default"))
    grams, sentences = _ngrams(ours), _sentences(ours)
    held = _held_out()
    assert len(held) >= 4 and all(held.values())  # fidelity, both question files, demo
    for name, texts in held.items():
        shared = sorted(" ".join(g) for g in grams & _ngrams(texts))
        assert not shared, f"calibration corpus shares 8-word sequences with {name}: {shared[:5]}"
        same = sorted(sentences & _sentences(texts))
        assert not same, f"calibration corpus shares sentences with {name}: {same[:5]}"


# --- packing --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.base)


def test_calibration_tokens_shape_determinism_and_seed(tokenizer):
    chats = C.load_chats("default")
    a = C.calibration_tokens(chats, tokenizer, samples=8, seq_len=64, seed=0)
    assert len(a) == 8 and all(len(s) == 64 for s in a)
    assert all(isinstance(t, int) for s in a for t in s)
    assert C.calibration_tokens(chats, tokenizer, samples=8, seq_len=64, seed=0) == a
    assert C.digest(C.calibration_tokens(chats, tokenizer, samples=8, seq_len=64, seed=0)) == C.digest(a)
    b = C.calibration_tokens(chats, tokenizer, samples=8, seq_len=64, seed=1)
    assert b != a and C.digest(b) != C.digest(a)
    # packing: the stream starts at the beginning of a rendered chat (documents are not cut at the front)
    assert any(C._render(chats, i, tokenizer, True)[:64] == a[0] for i in range(len(chats.samples)))


def test_chat_tokens_match_fidelity_tokenization(tokenizer):
    """Chats are tokenized as emq.fidelity.tokenize does: apply_chat_template(tokenize=True)."""
    chats = C.load_chats("default")
    for i in range(0, len(chats.samples), 10):
        expect = list(tokenizer.apply_chat_template(chats.samples[i], tokenize=True, return_dict=False))
        assert C._render(chats, i, tokenizer, True) == expect


def test_calibration_tokens_cycle_a_short_corpus_with_a_warning(tokenizer, caplog):
    chats = C.load_chats("default")
    with caplog.at_level(logging.WARNING, logger="emq.calibration"):
        x = C.calibration_tokens(chats, tokenizer, samples=128, seq_len=512)
    assert len(x) == 128 and all(len(s) == 512 for s in x)
    warned = [r.getMessage() for r in caplog.records if "distinct tokens" in r.getMessage()]
    assert len(warned) == 1 and "65536 requested" in warned[0]
    n = int(re.search(r"has (\d+) distinct tokens", warned[0]).group(1))
    flat = [t for s in x for t in s]
    assert flat[n:2 * n] != flat[:n]  # the second pass is shuffled afresh, not a copy of the first
    assert flat.count(tokenizer.eos_token_id) > len(chats.samples)  # EOS between documents


def test_digest_depends_on_the_split():
    assert C.digest([[1, 2], [3]]) != C.digest([[1], [2, 3]])
    assert len(C.digest([[1]])) == 64


class _PlainTokenizer:
    """No chat template: characters as ids."""

    chat_template = None
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


class _StrictTokenizer(_PlainTokenizer):
    chat_template = "strict"

    def apply_chat_template(self, messages, tokenize=False):
        if messages[0]["role"] == "system":
            raise ValueError("System role not supported")
        return "".join(m["content"] for m in messages)


def test_no_chat_template_falls_back_to_plain_text(tmp_path, caplog):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]}))
    with caplog.at_level(logging.WARNING, logger="emq.calibration"):
        x = C.calibration_tokens(C.load_chats(str(p)), _PlainTokenizer(), samples=2, seq_len=4)
    assert x == [[ord("a"), ord("b"), ord("\n"), ord("\n")], [ord("c"), ord("d"), 0, ord("a")]]
    assert any("no chat template" in r.getMessage() for r in caplog.records)


def test_a_chat_the_template_rejects_names_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    p.write_text(f"{json.dumps(good)}\n\n{json.dumps(bad)}\n")
    with pytest.raises(EmqError) as e:
        C.calibration_tokens(C.load_chats(str(p)), _StrictTokenizer(), samples=4, seq_len=8)
    assert str(p) in e.value.message and "line 3" in e.value.message and e.value.fix


# --- user corpora ---------------------------------------------------------------------------------

def test_user_jsonl_in_each_accepted_shape(tmp_path, tokenizer):
    p = tmp_path / "mine.jsonl"
    lines = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Teal."}]},
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hello there"},
                           {"from": "gpt", "value": "Hi! How can I help?"}]},
        {"text": "Plain text about kettles and teapots."},
    ]
    # a byte-order mark and blank lines are tolerated
    p.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x) for x in lines[:2]).encode() + b"\n\n"
                  + json.dumps(lines[2]).encode() + b"\n")
    chats = C.load_chats(str(p))
    assert chats.name == "mine" and chats.path == str(p) and chats.lines == [1, 2, 4]
    assert chats.samples[0] == lines[0]["messages"]
    assert chats.samples[1] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": "Hi! How can I help?"}]
    assert chats.samples[2] == "Plain text about kettles and teapots."
    x = C.calibration_tokens(chats, tokenizer, samples=4, seq_len=32, seed=3)
    assert len(x) == 4 and all(len(s) == 32 for s in x)
    text = tokenizer.decode([t for s in x for t in s])
    assert "kettles" in text and "<|im_start|>user\nHello there" in text


BAD = [
    # (file text, what the message says, the line it names)
    ("", "is empty", None),
    ("\n  \n", "is empty", None),
    ('{"text": "ok"}\nnot json\n', "line 2 is not JSON", 2),
    ('{"text": "ok"}\n{"text": "ok"}\n{"prompt": "a", "completion": "b"}\n',
     "line 3 has none of the accepted shapes", 3),
    ('[1, 2]\n', "line 1 has none of the accepted shapes", 1),
    ('{"text": ""}\n', "line 1 has none of the accepted shapes", 1),
    ('{"messages": []}\n', "line 1: messages must be a non-empty list", 1),
    ('{"text": "ok"}\n{"messages": [{"role": "user"}]}\n',
     "line 2: message 0 needs a 'role' and a string 'content'", 2),
    ('{"messages": [{"content": "hi"}]}\n', "line 1: message 0 needs a 'role'", 1),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}\n',
     "line 1: message 1 has unknown role 'tool'", 1),
    ('{"conversations": [{"from": "human"}]}\n', "line 1: message 0 needs a 'from' and a string 'value'", 1),
    ('{"conversations": [{"from": "bot", "value": "x"}]}\n', "line 1: message 0 has unknown from 'bot'", 1),
]


@pytest.mark.parametrize("text, says, line", BAD)
def test_bad_user_corpus_gives_one_error_naming_file_and_line(tmp_path, text, says, line):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(EmqError) as e:
        C.load_chats(str(p))
    assert str(p) in e.value.message and says in e.value.message, e.value.message
    assert "quant.calibration.corpus" in e.value.message and e.value.fix
    if line is not None:
        assert f"line {line}" in e.value.message


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(EmqError, match="not UTF-8") as e:
        C.load_chats(str(p))
    assert str(p) in e.value.message


def test_missing_file_and_unknown_shipped_name(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(EmqError) as e:
        C.load_chats(str(missing))
    assert str(missing) in e.value.message and "does not exist" in e.value.message and e.value.fix
    with pytest.raises(EmqError) as e:
        C.load_chats("no_such_corpus")
    assert "'no_such_corpus'" in e.value.message and "quant.calibration.corpus" in e.value.message and e.value.fix
