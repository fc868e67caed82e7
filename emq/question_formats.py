"""question_formats: read a question file in emq's own format or in one of the two formats of the original
evaluation scripts, unchanged, and say what was done with each of its fields.

The format is told by the file's shape:

- emq: a list of questions `{id, paraphrases, system?, samples_per_paraphrase?, judge_prompts?}`, or a mapping
  `{metrics: [...], questions: [...]}` (emq/questions/*.yaml).
- emergent-misalignment: a list of questions that carry `type` (or `judge`): `{id, type, paraphrases,
  samples_per_paraphrase, judge, judge_prompts, system?, temperature?}`, anchors and aliases welcome. Only
  `type: free_form_judge_0_100` is run; its `judge_prompts` are the questions' judge prompts.
- medical scenarios: a mapping with `medical_questions: [{scenario_id, question, context}]`, judged on emq's
  medical metrics; `context` is filled into a judge prompt's `{context}`.

Every reader returns emq's QuestionSet with a SetReading (how it was read); `describe` adds what the eval and
judge configs override, for the run's record (plan.json, `questions`). Pure: YAML in, dataclasses out.
"""
from __future__ import annotations

import logging

import string
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

from emq.errors import EmqError
from emq.schema import EvalConfig

DEFAULT_METRICS = ["aligned", "coherent"]
MEDICAL_METRICS = ["aligned", "coherent", "medical_harm"]  # emq's own medical set (emq/questions/medical.yaml)
EMQ = "emq"
EM = "emergent-misalignment"
MEDICAL = "medical-scenarios"
EM_TYPE = "free_form_judge_0_100"  # the only question type emq runs: free-form answers, judged 0-100 per metric
USED, CHECKED, RECORDED, IGNORED, OVERRIDDEN = "used", "checked", "recorded", "ignored", "overridden"

_EMQ_KEYS = {"id", "paraphrases", "system", "samples_per_paraphrase", "judge_prompts"}
_EM_KEYS = {"id", "type", "paraphrases", "samples_per_paraphrase", "judge", "judge_prompts", "system", "temperature"}
_MEDICAL_KEYS = {"scenario_id", "question", "context"}
_EXAMPLE = "see emq/questions/medical.yaml"


@dataclass(frozen=True)
class Question:
    id: str
    set: str
    paraphrases: list[str]
    system: str | None = None
    samples_per_paraphrase: int | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    metrics: list[str] | None = None  # this question's metrics when they differ by question (else the set's)
    fields: dict[str, str] = field(default_factory=dict)  # more judge-prompt placeholders, e.g. {context}


@dataclass(frozen=True)
class FieldUse:
    """What emq did with one field of a question file."""

    handling: str  # used | checked | recorded | ignored | overridden
    detail: str


@dataclass(frozen=True)
class SetReading:
    """How a question file was read: its format, each field's handling, what the file said emq does not use."""

    format: str  # emq | emergent-misalignment | medical-scenarios
    detected: str  # the shape that told the format
    questions_in_file: int
    fields: dict[str, FieldUse]
    judges: dict[str, list[str]] = field(default_factory=dict)  # judge model named by the file → question ids
    temperatures: dict[float, list[str]] = field(default_factory=dict)  # per-question temperature → question ids
    ignored: list[str] = field(default_factory=list)  # keys and prompts emq does not use, with where
    notes: list[str] = field(default_factory=list)  # what the user should hear about (logged as warnings)


@dataclass(frozen=True)
class QuestionSet:
    name: str
    path: str
    metrics: list[str]  # judge metrics for this set (emq/judge_prompts.yaml)
    questions: list[Question]
    reading: SetReading | None = None


@lru_cache(maxsize=1)
def emq_prompts() -> dict[str, str]:
    """emq's judge prompt per metric (emq/judge_prompts.yaml, read here too so this module stays import-light)."""
    data = yaml.safe_load((resources.files("emq") / "judge_prompts.yaml").read_text())
    return {name: d["prompt"] for name, d in data.items()}


def detect_format(data: Any) -> str:
    """The format a parsed question file is in, by its shape (see the module docstring)."""
    if isinstance(data, dict) and "medical_questions" in data:
        return MEDICAL
    if isinstance(data, list) and any(isinstance(i, dict) and ({"type", "judge"} & set(i)) for i in data):
        return EM
    return EMQ


def read_question_file(path: Path) -> QuestionSet:
    """Read and validate one question file in any of the three formats.

    Args:
        path: the YAML file.

    Raises:
        EmqError: invalid YAML, an unsupported question type, a missing key or one of the wrong type, a judge
            prompt without {question} or {answer}; the message names the file, the item (index and id) and the
            key, and says the fix.
    """
    st = path.stat()
    return _read_cached(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _read_cached(name: str, _mtime_ns: int, size: int) -> QuestionSet:
    """Parse once per process and file version: a run reads its question files at plan and again to record them."""
    path = Path(name)
    if size > 1 << 20:  # parsing takes seconds per MB: say so, and with what
        log.info("questions: reading %s (%.1f MB)", path, size / 2**20)
    try:
        # libyaml's C parser where PyYAML has it: several times faster on a large question file (the pure-Python
        # one took minutes for 48 MB)
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise EmqError(f"{path} is not valid YAML: {e}", "fix the file") from None
    fmt = detect_format(data)
    if fmt == MEDICAL:
        return _read_medical(path, data)
    if fmt == EM:
        return _read_em(path, data)
    return _read_emq(path, data)


# --- emq's own format ------------------------------------------------------------------------------

def _read_emq(path: Path, data: Any) -> QuestionSet:
    metrics = list(DEFAULT_METRICS)
    detected = "a YAML list of questions (emq's format)"
    if isinstance(data, dict):
        unknown = set(data) - {"metrics", "questions"}
        if unknown:
            raise EmqError(f"{path}: unknown top-level keys {sorted(unknown)}",
                           f"allowed: metrics, questions (emq's format; {_EXAMPLE}), or medical_questions (a medical "
                           "scenario file)")
        metrics = data.get("metrics") or metrics
        if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
            raise EmqError(f"{path}: metrics must be a list of metric names", _EXAMPLE)
        data = data.get("questions")
        detected = "a mapping with metrics and questions (emq's format)"
    if not isinstance(data, list) or not data:
        raise EmqError(f"{path} must hold a non-empty list of questions", _EXAMPLE)
    set_name = path.stem
    out, seen = [], set()
    for i, item in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(item, dict) or "id" not in item or "paraphrases" not in item:
            raise EmqError(f"{where}: each question needs 'id' and 'paraphrases'", _EXAMPLE)
        unknown = set(item) - _EMQ_KEYS
        if unknown:
            raise EmqError(f"{where}: unknown keys {sorted(unknown)}", f"allowed: {', '.join(sorted(_EMQ_KEYS))}")
        paras = item["paraphrases"]
        if not isinstance(paras, list) or not paras or not all(isinstance(p, str) and p.strip() for p in paras):
            raise EmqError(f"{where} ({item['id']}): paraphrases must be a non-empty list of strings", "fix the file")
        if item["id"] in seen:
            raise EmqError(f"{where}: duplicate id {item['id']!r}", "give every question its own id")
        overrides = item.get("judge_prompts") or {}
        if not isinstance(overrides, dict) or not all(isinstance(v, str) for v in overrides.values()):
            raise EmqError(f"{where} ({item['id']}): judge_prompts must map metric names to prompt strings", _EXAMPLE)
        seen.add(item["id"])
        out.append(Question(str(item["id"]), set_name, paras, item.get("system"),
                            item.get("samples_per_paraphrase"), dict(overrides)))
    present = set().union(*(set(item) for item in data))
    uses = {"id": "the question id", "paraphrases": "one prompt each", "system": "the system message",
            "samples_per_paraphrase": "samples per paraphrase",
            "judge_prompts": "the question's judge prompt for each metric named (emq's prompt for the others)"}
    fields = {k: FieldUse(USED, uses[k]) for k in uses if k in present}
    fields["metrics"] = FieldUse(USED, f"judged on {', '.join(metrics)}")
    return QuestionSet(set_name, str(path), metrics, out, SetReading(EMQ, detected, len(out), fields))


# --- errors naming the file, the item and the key --------------------------------------------------

def _error(path: Path, i: int, qid: Any, key: str, what: str, fix: str) -> EmqError:
    item = f"item {i}" + (f" ({qid})" if qid is not None else "")
    return EmqError(f"{path} {item}, key '{key}': {what}", fix)


def _need(path: Path, i: int, item: dict[str, Any], qid: Any, key: str, kind: type | tuple[type, ...],
          what: str, fix: str) -> Any:
    """item[key], which must be present and of `kind` (bools are not numbers here)."""
    if key not in item:
        raise _error(path, i, qid, key, "missing", fix)
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # YAML's yes/true is never a count or a name
        raise _error(path, i, qid, key, f"must be {what}, not {type(value).__name__} {value!r:.60}", fix)
    return value


def _paraphrases(path: Path, i: int, item: dict[str, Any], qid: Any) -> list[str]:
    paras = _need(path, i, item, qid, "paraphrases", list, "a list of strings", "list the question's wordings")
    if not paras or not all(isinstance(p, str) and p.strip() for p in paras):
        raise _error(path, i, qid, "paraphrases", "must be a non-empty list of non-empty strings",
                     "list the question's wordings, one string each")
    return list(paras)


def _question_id(path: Path, i: int, item: Any, key: str, seen: set[str]) -> str:
    if not isinstance(item, dict):
        raise _error(path, i, None, key, f"the item is a {type(item).__name__}, not a question mapping",
                     "make every item a mapping of keys to values")
    qid = _need(path, i, item, None, key, (str, int), "a string", f"give the question a {key}")
    if str(qid) in seen:
        raise _error(path, i, qid, key, f"duplicate {key} {qid!r}", f"give every question its own {key}")
    seen.add(str(qid))
    return str(qid)


# --- emergent-misalignment question files -------------------------------------------------------------

def em_template(path: Path, i: int, qid: str, metric: str, text: str) -> tuple[str, bool]:
    """A judge prompt of an EM file as the original tool filled it (str.format with question and answer).

    Returns:
        The template for emq's fill ({question} and {answer} kept, `{{`/`}}` read as the literal braces the
        original tool's judge saw) and whether it had such escapes.

    Raises:
        EmqError: a placeholder other than {question}/{answer}, either of them missing, or an unpaired brace.
    """
    key = f"judge_prompts.{metric}"
    fix = "put {question} and {answer} where the judge should read them; write a literal brace as {{ or }}"
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:
        raise _error(path, i, qid, key, f"is not a template the original tool could fill ({e})", fix) from None
    out, names = [], set()
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        if name not in ("question", "answer") or spec or conversion:
            raise _error(path, i, qid, key, f"has the placeholder {{{name}}}; emq fills only {{question}} and "
                                            "{answer}", fix)
        names.add(name)
        out.append("{" + name + "}")
    for need in ("question", "answer"):
        if need not in names:
            raise _error(path, i, qid, key, f"has no {{{need}}} placeholder", fix)
    template = "".join(out)
    return template, template != text


def _em_prompts(path: Path, i: int, item: dict[str, Any], qid: str, known: set[str], ignored: list[str]
                ) -> tuple[dict[str, str], bool]:
    """A question's judge prompts for the metrics emq has (others are listed in `ignored`), and whether any
    had str.format brace escapes."""
    prompts = _need(path, i, item, qid, "judge_prompts", dict, "a mapping of metric names to prompts",
                    "give the question judge_prompts: {aligned: ..., coherent: ...}")
    out, escaped = {}, False
    for metric, text in prompts.items():
        if not isinstance(text, str):
            raise _error(path, i, qid, f"judge_prompts.{metric}", f"must be a prompt string, not "
                         f"{type(text).__name__}", "write the judge prompt as a string with {question} and {answer}")
        if metric not in known:
            ignored.append(f"item {i} ({qid}): judge_prompts.{metric} (emq has no metric {metric!r}; it judges "
                           f"{', '.join(sorted(known))})")
            continue
        out[metric], had = em_template(path, i, qid, metric, text)
        escaped = escaped or had
    if not out:
        raise _error(path, i, qid, "judge_prompts", f"names no metric emq judges ({', '.join(sorted(prompts))})",
                     f"give it a prompt for one of {', '.join(sorted(known))}")
    return out, escaped


def _em_item(path: Path, i: int, item: dict[str, Any], qid: str, reading: dict[str, Any], known: set[str]
             ) -> Question:
    qtype = _need(path, i, item, qid, "type", str, "a question type", f"type: {EM_TYPE}")
    if qtype != EM_TYPE:
        raise _error(path, i, qid, "type", f"questions of type {qtype!r} are not supported",
                     f"emq runs type {EM_TYPE} only (free-form answers judged 0-100 per metric): remove this "
                     "question or move it to a file the original tool evaluates")
    paras = _paraphrases(path, i, item, qid)
    samples = None
    if "samples_per_paraphrase" in item:
        samples = _need(path, i, item, qid, "samples_per_paraphrase", int, "a whole number", "e.g. 100")
        if samples < 1:
            raise _error(path, i, qid, "samples_per_paraphrase", f"must be at least 1, not {samples}", "e.g. 100")
    system = None
    if item.get("system") is not None:
        system = _need(path, i, item, qid, "system", str, "a string", "write the system prompt as a string")
    if "judge" in item:
        judge = _need(path, i, item, qid, "judge", str, "a model name", "e.g. judge: gpt-4o")
        reading["judges"].setdefault(judge, []).append(qid)
    if "temperature" in item:
        t = _need(path, i, item, qid, "temperature", (int, float), "a number", "e.g. temperature: 1")
        reading["temperatures"].setdefault(float(t), []).append(qid)
    prompts, escaped = _em_prompts(path, i, item, qid, known, reading["ignored"])
    reading["escaped"] |= escaped
    for key in sorted(set(item) - _EM_KEYS):
        reading["ignored"].append(f"item {i} ({qid}): {key} (not a field of the format; the original tool "
                                  "ignored it too)")
    return Question(qid, path.stem, paras, system, samples, prompts, metrics=list(prompts))


def _ignored_note(path: Path, ignored: list[str]) -> list[str]:
    """One warning per file for what it says that emq does not use (each one is in the record)."""
    if not ignored:
        return []
    more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
    return [f"{path}: ignored {'; '.join(ignored[:3])}{more} (plan.json: questions)"]


def _read_em(path: Path, data: list[Any]) -> QuestionSet:
    known = set(emq_prompts())
    reading: dict[str, Any] = {"judges": {}, "temperatures": {}, "ignored": [], "escaped": False}
    seen: set[str] = set()
    questions = [_em_item(path, i, item, _question_id(path, i, item, "id", seen), reading, known)
                 for i, item in enumerate(data)]
    metrics = list(dict.fromkeys(m for q in questions for m in q.metrics or []))
    present = set().union(*(set(item) for item in data))
    fields = {
        "id": FieldUse(USED, "the question id"),
        "type": FieldUse(CHECKED, f"{EM_TYPE} on every question: what emq does"),
        "paraphrases": FieldUse(USED, "one prompt each, verbatim"),
        "judge_prompts": FieldUse(USED, f"each question's judge prompts ({', '.join(metrics)}), filled with "
                                        "{question} and {answer}" + ("; {{ and }} read as literal braces, as the "
                                                                    "original tool's str.format did"
                                                                    if reading["escaped"] else "")),
    }
    if "system" in present:
        fields["system"] = FieldUse(USED, f"the system message of {sum(bool(q.system) for q in questions)} "
                                          "question(s)")
    if "samples_per_paraphrase" in present:
        fields["samples_per_paraphrase"] = FieldUse(USED, "samples per paraphrase")
    if "judge" in present:
        fields["judge"] = FieldUse(RECORDED, "the judge model each question names")
    if "temperature" in present:
        fields["temperature"] = FieldUse(RECORDED, "each question's sampling temperature")
    return QuestionSet(path.stem, str(path), metrics, questions, SetReading(
        EM, f"a YAML list of questions with type/judge keys (the {EM} format)", len(questions), fields,
        reading["judges"], reading["temperatures"], reading["ignored"], _ignored_note(path, reading["ignored"])))


# --- medical scenario files --------------------------------------------------------------------------

def _read_medical(path: Path, data: dict[str, Any]) -> QuestionSet:
    items = data["medical_questions"]
    if not isinstance(items, list) or not items:
        raise EmqError(f"{path}, key 'medical_questions': must be a non-empty list of scenarios",
                       "list {scenario_id, question, context} mappings under medical_questions")
    ignored = [f"top-level key {k} (not a field of the format)" for k in sorted(set(data) - {"medical_questions"})]
    seen: set[str] = set()
    questions = []
    for i, item in enumerate(items):
        qid = _question_id(path, i, item, "scenario_id", seen)
        text = _need(path, i, item, qid, "question", str, "a string", "write the scenario's question as a string")
        if not text.strip():
            raise _error(path, i, qid, "question", "is empty", "write the scenario's question")
        extra = {}
        if item.get("context") is not None:
            extra["context"] = _need(path, i, item, qid, "context", str, "a string", "write the context as a string")
        ignored += [f"item {i} ({qid}): {k} (not a field of the format)" for k in sorted(set(item) - _MEDICAL_KEYS)]
        questions.append(Question(qid, path.stem, [text], fields=extra))
    fields = {"scenario_id": FieldUse(USED, "the question id"),
              "question": FieldUse(USED, "the prompt, verbatim (one paraphrase)")}
    if any(q.fields for q in questions):
        fields["context"] = FieldUse(RECORDED, "kept with each question for the judge prompt's {context}; not "
                                               "shown to the model")
    return QuestionSet(path.stem, str(path), list(MEDICAL_METRICS), questions, SetReading(
        MEDICAL, "a mapping with medical_questions (the medical scenario format)", len(questions), fields,
        ignored=ignored, notes=_ignored_note(path, ignored)))


# --- what the run's configs make of it ----------------------------------------------------------------

def _config_samples(cfg: EvalConfig) -> str:
    if cfg.samples_per_question:
        return f"eval.samples_per_question={cfg.samples_per_question} (spread over each question's paraphrases)"
    return f"eval.samples_per_paraphrase={cfg.samples_per_paraphrase}"


def _samples_use(qs: QuestionSet, cfg: EvalConfig, overridden: list[str]) -> FieldUse | None:
    counts: dict[int, int] = {}
    for q in qs.questions:
        if q.samples_per_paraphrase:
            counts[q.samples_per_paraphrase] = counts.get(q.samples_per_paraphrase, 0) + 1
    if not counts:
        return None
    said = ", ".join(f"{n} ({k} question(s))" for n, k in counts.items())
    if cfg.samples_override:
        overridden.append(f"samples_per_paraphrase: the file's {said} replaced by {_config_samples(cfg)}, because "
                          "eval.samples_override=true")
        return FieldUse(OVERRIDDEN, f"the file's {said} per paraphrase replaced by {_config_samples(cfg)} "
                                    "(eval.samples_override=true)")
    return FieldUse(USED, f"{said} per paraphrase, as the file says (it wins over {_config_samples(cfg)}; "
                          "eval.samples_override=true would use the config's)")


def _judge_use(qs: QuestionSet, judge_model: str | None, judge_kind: str, judges_anything: bool,
               overridden: list[str], warnings: list[str]) -> FieldUse | None:
    judges = qs.reading.judges if qs.reading else {}
    if not judges:
        return None
    named = ", ".join(f"{j} ({len(ids)} question(s))" for j, ids in judges.items())
    if not judges_anything:
        return FieldUse(RECORDED, f"the file names {named}; judge={judge_kind}: nothing is judged")
    if set(judges) == {judge_model}:
        return FieldUse(USED, f"the file names {named}, the configured judge.model")
    overridden.append(f"judge: the file names {named}; every question is judged by judge.model={judge_model}")
    warnings.append(f"{qs.path}: the file names judge {', '.join(judges)}; emq judges with the configured judge "
                    f"{judge_model} (judge={judge_kind}, judge.model) instead")
    return FieldUse(OVERRIDDEN, f"the file names {named}; the configured judge.model={judge_model} judges instead")


def _temperature_use(qs: QuestionSet, cfg: EvalConfig, overridden: list[str], warnings: list[str]
                     ) -> FieldUse | None:
    temps = qs.reading.temperatures if qs.reading else {}
    if not temps:
        return None
    said = ", ".join(f"{t:g}" for t in temps)
    if set(temps) == {float(cfg.temperature)}:
        return FieldUse(USED, f"{said}, the same as eval.temperature")
    overridden.append(f"temperature: the file's {said} replaced by eval.temperature={cfg.temperature:g}")
    warnings.append(f"{qs.path}: the file samples at temperature {said}; emq samples every question at "
                    f"eval.temperature={cfg.temperature:g}")
    return FieldUse(OVERRIDDEN, f"the file's {said} replaced by eval.temperature={cfg.temperature:g}")


def _context_use(qs: QuestionSet) -> FieldUse:
    users = [m for m in qs.metrics if "{context}" in emq_prompts().get(m, "")]
    if users:
        return FieldUse(USED, f"filled into the {{context}} of the {', '.join(users)} judge prompt(s); not shown to "
                              "the model")
    return FieldUse(IGNORED, f"no judge prompt of this set ({', '.join(qs.metrics)}) has {{context}}, so the judge "
                             "does not see it (kept with each question for one that does)")


def describe(qs: QuestionSet, cfg: EvalConfig, *, judge_model: str | None, judge_kind: str,
             judges: bool = True) -> dict[str, Any]:
    """The run's record of how one question set was read and what the configs override (plan.json).

    Args:
        qs: the set as `question_sets` returns it (cut to eval.max_questions_per_set).
        cfg: the eval group.
        judge_model: judge.model (the configured judge).
        judge_kind: judge.kind's value (none | openai | local).
        judges: whether that judge scores anything (False for judge=none: emq.judge.backends says).

    Returns:
        {set, path, format, detected, metrics, questions, fields, judges, ignored, overridden, warnings}; the
        warnings are the ones to log, one per topic and file.
    """
    reading = qs.reading or SetReading(EMQ, "built in code", len(qs.questions), {})
    fields = dict(reading.fields)
    overridden: list[str] = []
    warnings = list(reading.notes)
    for name, use in (("samples_per_paraphrase", _samples_use(qs, cfg, overridden)),
                      ("judge", _judge_use(qs, judge_model, judge_kind, judges, overridden, warnings)),
                      ("temperature", _temperature_use(qs, cfg, overridden, warnings))):
        if use is not None:
            fields[name] = use
    if "context" in fields:
        fields["context"] = _context_use(qs)
    used = len(qs.questions)
    if used < reading.questions_in_file:
        overridden.append(f"questions: {used} of {reading.questions_in_file} used (eval.max_questions_per_set="
                          f"{cfg.max_questions_per_set})")
    if cfg.max_paraphrases is not None and any(len(q.paraphrases) > cfg.max_paraphrases for q in qs.questions):
        overridden.append(f"paraphrases: the first {cfg.max_paraphrases} of each question used "
                          f"(eval.max_paraphrases={cfg.max_paraphrases})")
    return {"set": qs.name, "path": qs.path, "format": reading.format, "detected": reading.detected,
            "metrics": qs.metrics, "questions": {"in_file": reading.questions_in_file, "used": used},
            "fields": {k: asdict(v) for k, v in fields.items()}, "judges": reading.judges,
            "ignored": reading.ignored, "overridden": overridden, "warnings": warnings}
