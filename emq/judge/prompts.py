"""The judge's prompts: the metrics emq judges (emq/judge_prompts.yaml), a question set's own overrides, and the
filled prompt a judge reads (`fill`)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from emq.errors import EmqError


@dataclass(frozen=True)
class Metric:
    name: str
    prompt: str
    categories: list[str]
    higher_is_better: bool
    description: str


@lru_cache(maxsize=1)
def metric_specs() -> dict[str, Metric]:
    """The judge prompts shipped with emq (emq/judge_prompts.yaml)."""
    data = yaml.safe_load((resources.files("emq") / "judge_prompts.yaml").read_text())
    return {name: Metric(name, d["prompt"], list(d.get("categories") or []), bool(d.get("higher_is_better", True)),
                         d.get("description", "")) for name, d in data.items()}


def check_prompts(prompts: list[dict[str, Any]]) -> None:
    """Every metric a question set asks for has a prompt; overrides fill {question} and {answer}."""
    specs = metric_specs()
    for p in prompts:
        where = f"question set {p['set']}, question {p['question_id']}"
        for m in p["metrics"]:
            if m not in specs:
                raise EmqError(f"{where}: unknown judge metric {m!r}", f"use one of {sorted(specs)}")
        for m, text in p["judge_prompts"].items():
            if m not in p["metrics"]:
                raise EmqError(f"{where}: judge_prompts overrides {m!r}, which its set does not judge",
                               f"add {m} to the set's metrics or remove the override")
            if "{answer}" not in text:
                raise EmqError(f"{where}: the judge_prompts.{m} override has no {{answer}} placeholder",
                               "put {question} and {answer} where the judge should read them")


def fill(template: str, question: str, answer: str, fields: dict[str, str] | None = None) -> str:
    """The judge prompt: `template` with {question}, {answer} and any of `fields` (e.g. {context}) filled in.

    One pass over the template, not str.format: answers and prompts contain braces of their own, and an
    answer that happens to contain "{question}" must reach the judge as written.
    """
    values = {**(fields or {}), "question": question, "answer": answer}
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def judge_template(p: dict[str, Any], metric: str) -> tuple[str, str]:
    """The template a prompt's answers are judged with on `metric`, and where it comes from."""
    own = p["judge_prompts"].get(metric)
    if own is not None:
        return own, "question set"
    return metric_specs()[metric].prompt, "emq/judge_prompts.yaml"


def prompts_record(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """judge.json's `prompts`: per question and metric, the template judged with (by hash) and where it came from;
    each template's text once. A judge prompt is this template with {question}, {answer} (and e.g. {context})
    filled in (`fill`)."""
    templates: dict[str, dict[str, str]] = {}
    questions: dict[str, dict[str, dict[str, str]]] = {}
    for p in prompts:
        per_metric = questions.setdefault(f"{p['set']}/{p['question_id']}", {})
        for m in p["metrics"]:
            text, source = judge_template(p, m)
            h = hashlib.sha256(text.encode()).hexdigest()[:12]
            templates.setdefault(h, {"metric": m, "from": source, "text": text})
            per_metric[m] = {"template": h, "from": source}
    return {"questions": questions, "templates": templates}
