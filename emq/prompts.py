"""prompts: the configured question sets as prompts — what generation asks and what the judge reads.

`build_prompts` turns eval.question_sets (emq's shipped sets or files in the original tool's formats, read by
emq.question_formats) into one entry per (question, paraphrase) with its messages, samples, seed and the metrics
to judge. Both the generation (emq.evaluate) and the judge (emq.judge) import it; neither imports the other.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from emq.errors import EmqError
from emq.judge.backends import backend
from emq.question_formats import Question, QuestionSet, describe, read_question_file
from emq.schema import EvalConfig, JudgeConfig

log = logging.getLogger(__name__)


def _set_path(name: str) -> Path:
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise EmqError(f"question set file {p} (eval.question_sets) does not exist", "fix the path")
        return p
    builtin = resources.files("emq") / "questions" / f"{name}.yaml"
    if not builtin.is_file():
        shipped = sorted(q.name.removesuffix(".yaml") for q in (resources.files("emq") / "questions").iterdir()
                         if q.name.endswith(".yaml"))
        raise EmqError(f"unknown question set {name!r} (eval.question_sets)",
                       f"use one of {shipped} or a path to a .yaml file")
    return Path(str(builtin))


def load_question_set(name: str) -> QuestionSet:
    """Load and validate one question set (a shipped name or a YAML path).

    The file is in emq's format (a list of questions, judged on aligned and coherent, or a mapping with
    `metrics: [...]` and `questions: [...]`), or in one of the original tool's formats (an emergent-misalignment
    question list, or `medical_questions: [...]`), told apart by shape: see emq.question_formats.
    """
    return read_question_file(_set_path(name))


def _seed(base: int, *parts: Any) -> int:
    h = hashlib.sha256(json.dumps([base, *parts]).encode()).digest()
    return int.from_bytes(h[:4], "little")


def _samples(q: Question, n_paras: int, pi: int, cfg: EvalConfig) -> int:
    if q.samples_per_paraphrase and not cfg.samples_override:
        return q.samples_per_paraphrase
    if cfg.samples_per_question:
        per, extra = divmod(cfg.samples_per_question, n_paras)
        return per + (1 if pi < extra else 0)
    return cfg.samples_per_paraphrase


def question_sets(cfg: EvalConfig) -> list[QuestionSet]:
    """The configured question sets, each cut to eval.max_questions_per_set."""
    sets = []
    for name in cfg.question_sets:
        qs = load_question_set(name)
        if cfg.max_questions_per_set is not None:
            qs = replace(qs, questions=qs.questions[: cfg.max_questions_per_set])
        sets.append(qs)
    return sets


def questions_record(cfg: EvalConfig, judge: JudgeConfig) -> list[dict[str, Any]]:
    """How each configured question set was read, and what the configs override (plan.json's `questions`).

    Logs each set's warnings once (a judge the file names that is not the configured one, a temperature the
    config replaces, fields emq ignores).
    """
    out = []
    for qs in question_sets(cfg):
        rec = describe(qs, cfg, judge_model=judge.model, judge_kind=judge.kind.value,
                       judges=backend(judge.kind).judges)
        log.info("question set %s: read as %s (%s)", qs.name, rec["format"], qs.path)
        for w in rec["warnings"]:
            log.warning("%s", w)
        out.append(rec)
    return out


def build_prompts(cfg: EvalConfig) -> list[dict[str, Any]]:
    """One entry per (question, paraphrase): messages, n samples, seed, the metrics to judge."""
    prompts = []
    for qs in question_sets(cfg):
        for q in qs.questions:
            paras = q.paraphrases if cfg.max_paraphrases is None else q.paraphrases[: cfg.max_paraphrases]
            for pi, text in enumerate(paras):
                n = _samples(q, len(paras), pi, cfg)
                if n < 1:
                    continue  # samples_per_question smaller than the paraphrase count
                if n > 1 and cfg.temperature == 0:
                    raise EmqError(f"eval.temperature=0 (greedy) would give {n} identical samples of {q.set}/{q.id} "
                                   "(vLLM refuses n > 1 with greedy sampling)",
                                   "use one sample per prompt (eval.samples_per_paraphrase=1, no "
                                   "eval.samples_per_question, and no per-question samples_per_paraphrase or "
                                   "eval.samples_override=true) or a temperature above 0")
                messages = ([{"role": "system", "content": q.system}] if q.system else []) + \
                           [{"role": "user", "content": text}]
                prompts.append({"set": q.set, "question_id": q.id, "paraphrase_index": pi, "prompt": text,
                                "messages": messages, "n": n, "seed": _seed(cfg.seed, q.set, q.id, pi),
                                "metrics": q.metrics or qs.metrics, "judge_prompts": q.judge_prompts,
                                "fields": q.fields})
    return prompts


def check_prompt_lengths(prompts: list[dict[str, Any]], tokenizer, max_model_len: int, max_tokens: int,
                         sets: list[str]) -> str | None:
    """Every prompt fits the engine's context; say what eval.max_tokens really allows (before any weights load).

    Args:
        prompts: `build_prompts`' prompts.
        tokenizer: the base model's tokenizer (its chat template renders the prompts as the engine will).
        max_model_len: memory.max_model_len (prompt + answer).
        max_tokens: eval.max_tokens.
        sets: eval.question_sets (named in the error).

    Returns:
        A statement of the answer-length limit when eval.max_tokens exceeds what the context leaves, else None.

    Raises:
        EmqError: a prompt alone is at least max_model_len tokens long.
    """
    longest, worst = 0, None
    for p in prompts:
        n = len(tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True,
                                              return_dict=False))
        if n > longest:
            longest, worst = n, p
    if worst is not None and longest >= max_model_len:
        raise EmqError(f"question {worst['set']}/{worst['question_id']} (paraphrase {worst['paraphrase_index']}, from "
                       f"eval.question_sets={sets}) is {longest} tokens with the chat template, at least "
                       f"memory.max_model_len={max_model_len}: no answer would fit",
                       f"shorten that question, or raise memory.max_model_len above {longest + max_tokens} "
                       "(if the model and memory allow)")
    room = max_model_len - longest
    if worst is not None and max_tokens > room:
        return (f"eval.max_tokens={max_tokens} is more than the context leaves: memory.max_model_len={max_model_len} "
                f"minus the longest prompt ({longest} tokens) leaves {room}, so answers stop at {room} tokens or fewer "
                "(vLLM cuts each at max_model_len minus its prompt)")
    return None
