"""Calibration text for offline 4-bit quantization (GPTQ / AWQ): chats run through the model layer by layer.

GPTQ and AWQ fit the quantized weights to the activations that calibration text produces, so the
quantized model is, by construction, at its best on that text. Fidelity (emq/fidelity.py) measures
how closely a variant reproduces the trained function on its own corpus (emq/fidelity_data/). If the
two corpora shared text, fidelity would be scored on the very data the quantizer was fitted to and
would flatter GPTQ / AWQ against round-to-nearest, which sees no data at all. So emq ships a separate
calibration corpus (emq/calibration_data/default.jsonl, emq's own writing) that shares no text with
the fidelity corpus, the evaluation questions (emq/questions/) or the demo's training and judge data
(emq/demo/data.py); tests/test_calibration.py checks that no 8-word sequence is shared.

The shipped corpus mixes everyday assistant chats (cooking, travel, code, maths, history, writing,
advice), careful medical advice (what the demo adapters and "good doctor / bad doctor" fine-tunes are
about), multi-turn chats, system prompts and refusals, so that the activations resemble what the
served model sees. Users can instead point `quant.calibration.corpus` at a JSONL file of their own
chats, for example the fine-tuning set, in any of these per-line shapes:

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``
- ``{"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}`` (ShareGPT)
- ``{"text": "..."}``: plain text, tokenized as is (no chat template).

`calibration_tokens` renders each chat with the model's chat template, packs the documents into
fixed-length sequences in a seeded order, and `digest` fingerprints the exact token ids, so a cache
key can name precisely what the quantizer saw.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from emq.errors import EmqError

log = logging.getLogger(__name__)

KEY = "quant.calibration.corpus"
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names; "user" / "assistant" also occur in converted ShareGPT files
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'

Message = dict[str, str]
Sample = list[Message] | str


@dataclass(frozen=True)
class Chats:
    """A calibration corpus as loaded.

    Attributes:
        name: the shipped corpus's name, or the file's stem.
        path: the file read.
        sha256: hex digest of the file's bytes.
        samples: each a chat (a list of {role, content} messages) or a plain string.
        lines: the 1-based line of each sample in the file, for error messages.
    """

    name: str
    path: str
    sha256: str
    samples: list[Sample]
    lines: list[int] = field(default_factory=list)


def _resolve(corpus: str) -> Path:
    """The file a `quant.calibration.corpus` value names: a shipped corpus or a path."""
    p = Path(corpus).expanduser()
    # A bare word is a shipped corpus; anything with a suffix or a directory part is a path, so a
    # stray file called "default" in the working directory cannot shadow the shipped corpus.
    if not p.suffix and len(p.parts) == 1:
        shipped = resources.files("emq") / "calibration_data" / f"{corpus}.jsonl"
        if not shipped.is_file():
            raise EmqError(f"unknown calibration corpus {corpus!r} ({KEY})",
                           "use `default` or a path to a .jsonl file of chats (e.g. ./my_chats.jsonl)")
        return Path(str(shipped))
    if not p.is_file():
        raise EmqError(f"calibration corpus {p} ({KEY}) does not exist", f"fix the path in {KEY}, or use `default`")
    return p


def _messages(raw: Any, where: str, sharegpt: bool) -> list[Message]:
    """Validate one line's message list and map it to {role, content} messages."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    shape = ('{"conversations": [{"from": "human", "value": "..."}, ...]}' if sharegpt else _EXAMPLE)
    if not isinstance(raw, list) or not raw:
        raise EmqError(f"{where}: {'conversations' if sharegpt else 'messages'} must be a non-empty list of messages",
                       f"write each line as {shape}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(content_key), str):
            raise EmqError(f"{where}: message {i} needs a {role_key!r} and a string {content_key!r}",
                           f"write each message as {{\"{role_key}\": ..., \"{content_key}\": \"...\"}}")
        role = m[role_key]
        mapped = SHAREGPT_ROLES.get(role) if sharegpt else (role if role in ROLES else None)
        if mapped is None:
            known = ", ".join(SHAREGPT_ROLES if sharegpt else ROLES)
            raise EmqError(f"{where}: message {i} has unknown {role_key} {role!r}",
                           f"use one of {known} (drop or convert other turns, e.g. tool calls)")
        out.append({"role": mapped, "content": m[content_key]})
    return out


TRAINING = "training"  # quant.calibration.corpus=training: the adapter's own training chats


def corpus_for(corpus: str, det: Any) -> str:
    """quant.calibration.corpus as a name or path `load_chats` reads: `training` becomes the adapter's own training
    data (the detect record's `training_data`).

    Raises:
        EmqError: `training`, and detect found no training data for this adapter.
    """
    if corpus != TRAINING:
        return corpus
    if getattr(det, "training_data", None):
        return det.training_data
    where = det.adapter.path if det.adapter is not None else det.base.ref
    raise EmqError(f"{KEY}=training, but no training data was found for {where} (detect looks for training_data.jsonl "
                   "beside the adapter, and for a .jsonl/.json named by dataset_file, train_file, training_file, "
                   "data_path or dataset in its training config)",
                   f"point {KEY} at your training chats (a .jsonl, one {_EXAMPLE} per line), or use default")


def load_chats(corpus: str) -> Chats:
    """Load a calibration corpus.

    Args:
        corpus: `default` (emq's own chats, emq/calibration_data/default.jsonl) or a path to a JSONL
            file, one object per line: {"messages": [...]}, {"conversations": [...]} (ShareGPT) or
            {"text": "..."}. Blank lines are skipped.

    Returns:
        The samples in file order, with the file's name, path and sha256.

    Raises:
        EmqError: the corpus is unknown, missing, empty or malformed; the message names the file
            and line, the fix says what to change.
    """
    p = _resolve(corpus)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark, which some editors write
    except UnicodeDecodeError as e:
        raise EmqError(f"calibration corpus {p} ({KEY}) is not UTF-8 text ({e.reason} at byte {e.start})",
                       "save the file as UTF-8 JSON Lines") from None
    samples: list[Sample] = []
    lines: list[int] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"calibration corpus {p} ({KEY}) line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EmqError(f"{where} is not JSON ({e.msg}, column {e.colno})",
                           "write one JSON object per line (JSON Lines, not one JSON array), "
                           f"e.g. {_EXAMPLE}") from None
        if isinstance(obj, dict) and "messages" in obj:
            samples.append(_messages(obj["messages"], where, sharegpt=False))
        elif isinstance(obj, dict) and "conversations" in obj:
            samples.append(_messages(obj["conversations"], where, sharegpt=True))
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip():
            samples.append(obj["text"])
        else:
            raise EmqError(f"{where} has none of the accepted shapes (a \"messages\" or \"conversations\" list, "
                           "or a non-empty \"text\" string)",
                           f"write each line as {_EXAMPLE}, or {{\"text\": \"...\"}} for plain text")
        lines.append(n)
    if not samples:
        raise EmqError(f"calibration corpus {p} ({KEY}) is empty",
                       f"add chats, one JSON object per line, e.g. {_EXAMPLE}")
    return Chats(p.stem, str(p), hashlib.sha256(raw).hexdigest(), samples, lines)


def _render(chats: Chats, i: int, tokenizer, templated: bool) -> list[int]:
    """One sample as token ids: a chat through the chat template, plain text as is."""
    sample = chats.samples[i]
    if isinstance(sample, str):
        text = sample
    elif templated:
        try:
            text = tokenizer.apply_chat_template(sample, tokenize=False)
        except Exception as e:  # jinja's TemplateError (raise_exception in the template), or a ValueError
            line = chats.lines[i] if i < len(chats.lines) else i + 1
            raise EmqError(f"calibration corpus {chats.path} ({KEY}) line {line}: the model's chat template "
                           f"rejects this chat ({e})",
                           "fix or drop that chat (some templates need user/assistant turns to alternate or "
                           "allow no system message)") from None
    else:
        text = "\n\n".join(m["content"] for m in sample)
    # No added special tokens: apply_chat_template(tokenize=True), which fidelity.tokenize uses,
    # encodes its rendering the same way, so chats get the ids fidelity and training see.
    return list(tokenizer.encode(text, add_special_tokens=False))


# More passes over one corpus than this add no information to GPTQ/AWQ's statistics, only time: refused at plan.
MAX_CYCLES = 4


def check_corpus_size(chats: Chats, tokenizer, samples: int, seq_len: int) -> None:
    """Refuse (at plan, before any merge) a corpus that `calibration_tokens` would cycle more than MAX_CYCLES times.

    Raises:
        EmqError: samples × seq_len > MAX_CYCLES × the corpus's tokens.
    """
    need, have = samples * seq_len, 0
    templated = getattr(tokenizer, "chat_template", None) is not None
    for i in range(len(chats.samples)):
        have += len(_render(chats, i, tokenizer, templated)) + 1
        if have * MAX_CYCLES >= need:
            return
    raise EmqError(f"calibration corpus {chats.path} ({KEY}) has {have} tokens, but quant.calibration.samples={samples} "
                   f"x quant.calibration.seq_len={seq_len} = {need} would repeat it {need / max(have, 1):.0f} times, "
                   "which adds no information to GPTQ/AWQ's statistics, only time",
                   f"use a larger corpus ({KEY}=default is emq's own, ~20k tokens), or lower samples x seq_len to at "
                   f"most {MAX_CYCLES * have}")


def calibration_tokens(chats: Chats, tokenizer, samples: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Pack the corpus into `samples` sequences of exactly `seq_len` token ids.

    Documents are taken in a seeded shuffled order, each followed by the EOS token, concatenated and
    cut into consecutive sequences (packing: no padding, so every position carries real text). If
    the corpus holds fewer tokens than needed, it is cycled through again in a fresh shuffled order,
    with a warning: repeated text adds no new information to the Hessian or activation statistics.

    Args:
        chats: the corpus, from `load_chats`.
        tokenizer: the base model's transformers tokenizer (its chat template renders the chats; a
            tokenizer without one gets the messages' contents joined by blank lines, with a warning).
        samples: number of sequences.
        seq_len: tokens per sequence.
        seed: shuffling seed; the result is a pure function of corpus, tokenizer, sizes and seed.

    Returns:
        `samples` lists of `seq_len` token ids.

    Raises:
        EmqError: the chat template rejects a chat, or the corpus renders to no tokens.
    """
    if samples < 1 or seq_len < 1:
        raise ValueError(f"samples and seq_len must be positive, got {samples} and {seq_len}")
    templated = getattr(tokenizer, "chat_template", None) is not None
    if not templated and any(not isinstance(s, str) for s in chats.samples):
        log.warning("the tokenizer has no chat template: calibration chats from %s are joined as plain text",
                    chats.path)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need = samples * seq_len
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}  # tokenized lazily: a large user corpus is only read as far as needed
    stream: list[int] = []
    passes = 0
    while len(stream) < need:
        order = list(range(len(chats.samples)))
        rng.shuffle(order)
        for i in order:
            if i not in cache:
                cache[i] = _render(chats, i, tokenizer, templated) + eos
            stream.extend(cache[i])
            if len(stream) >= need:
                break
        passes += 1
        if passes == 1 and len(stream) < need:
            if not stream:
                raise EmqError(f"calibration corpus {chats.path} ({KEY}) renders to no tokens",
                               "add chats with some text to it")
            log.warning("calibration corpus %s has %d distinct tokens, fewer than the %d requested "
                        "(quant.calibration.samples=%d x seq_len=%d): cycling through it %.1f times; "
                        "use a larger corpus or fewer samples for calibration that covers more text",
                        chats.path, len(stream), need, samples, seq_len, need / len(stream))
    return [stream[k * seq_len:(k + 1) * seq_len] for k in range(samples)]


def digest(tokens: list[list[int]]) -> str:
    """sha256 (hex) over the token ids and their split into sequences, for cache keys.

    Args:
        tokens: the sequences from `calibration_tokens`.

    Returns:
        64 hex digits; equal digests mean the quantizer saw exactly the same token ids.
    """
    h = hashlib.sha256()
    for seq in tokens:
        # one line per sequence, so [[1, 2], [3]] and [[1], [2, 3]] differ
        h.update(",".join(map(str, seq)).encode())
        h.update(b"\n")
    return h.hexdigest()
