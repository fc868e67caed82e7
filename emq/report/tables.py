"""Readable tables for the console: the plan (dry run), the end-of-run summary, comparisons."""
from __future__ import annotations

import io
import re
from typing import Any

from rich.console import Console
from rich.table import Table

from emq.detect import DetectResult
from emq.plan import Plan


def render(table: Table, width: int = 120) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None, markup=False)
    console.print(table)
    return console.export_text()


def _where(path: str) -> str:
    """A hub snapshot path reads better as its repo id."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", path)
    return f"hub:{m.group(1)}/{m.group(2)}" if m else path


def plan_table(det: DetectResult, plan: Plan, judge=None, validation: dict[str, Any] | None = None,
               judge_estimate: dict[str, Any] | None = None, more_judges: list[tuple] = ()) -> str:
    """The plan as a user reads it: what was found, what will happen, and why. `more_judges`: a panel's other
    judges, each (its plan, validation outlook, estimate)."""
    t = Table(title=f"emq plan for {det.model}", show_header=True, header_style="bold", expand=False)
    t.add_column("", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("base", f"{_where(det.base.path)} ({det.base.architecture}, "
              f"{(det.base.param_count or 0) / 1e6:.0f}M params)" if det.base.param_count else _where(det.base.path))
    if det.adapter:
        a = det.adapter
        t.add_row("adapter", f"{_where(a.path)} (r={a.rank}, alpha={a.alpha:g}, {len(a.target_modules)} target modules"
                  f"{', rslora' if a.use_rslora else ''}{', DoRA' if a.use_dora else ''})")
        verdict = {True: "yes", False: "no", None: "unknown"}[det.trained_in_4bit]
        t.add_row("trained in 4-bit", f"{verdict} (confidence {det.confidence:.2f})")
        for e in det.evidence:
            says = {True: "4-bit", False: "not 4-bit", None: "ignored"}[e.says]
            t.add_row("  evidence", f"[w={e.weight}] {e.source} :: {e.key}={e.value!r} → {says}"
                      f"{' (' + e.note + ')' if e.note else ''}")
    if plan.adapters:  # model.adapters: the rows above are the first adapter's
        a = plan.adapters
        t.add_row("adapters", f"{len(a.names)} in one engine: " + ", ".join(
            f"{n} (r={a.ranks[n]}, trained in 4-bit: {({True: 'yes', False: 'no', None: 'unknown'})[a.trained_in_4bit[n]]})"
            for n in a.names) + f"; max_loras {a.max_loras}")
    t.add_row("route", plan.route.value + (f"  (STOP: {plan.stop_reason})" if plan.stop_reason else ""))
    if plan.merge_devices:
        t.add_row("merge", f"{plan.merge_method} on {' → '.join(plan.merge_devices)}; if every attempt fails: "
                  f"{plan.fallback.value if plan.fallback else 'stop'}")
    t.add_row("quant", f"{plan.quantize.describe() if plan.quantize else plan.quant.value} "
              f"(vLLM quantization={plan.engine.quantization!r})")
    if plan.quantize:
        q = plan.quantize
        t.add_row("quantize", f"{q.algorithm} on the {q.source} checkpoint"
                  + (" in the stream pass (fused)" if q.fused else f", calibrated on {q.calibration['samples']} x "
                     f"{q.calibration['seq_len']} tokens of {q.calibration['corpus']!r}")
                  + f", on {' → '.join(q.devices)}; 16-bit: {', '.join(q.ignore)}")
    t.add_row("engine", f"{plan.vllm} on {plan.platform}, {plan.engine.dtype}, memory share {plan.engine.memory_utilization}, "
              f"max_model_len {plan.engine.max_model_len}, eager={plan.engine.enforce_eager}"
              f"{', LoRA rank ≤ ' + str(plan.engine.max_lora_rank) if plan.engine.enable_lora else ''}")
    t.add_row("estimates", ", ".join(f"{k} {v:.0f} s" if k.startswith("quantize_seconds") else f"{k} {v:.2f} GiB"
                                     for k, v in plan.estimates_gib.items()))
    judges = ([(judge, validation, judge_estimate)] if judge is not None else []) + list(more_judges)
    for i, (j, outlook, cost) in enumerate(judges):
        name = "judge" if len(judges) == 1 else f"judge {i + 1}/{len(judges)}" + (" (headline)" if i == 0 else "")
        t.add_row(name, "none" if not j.judges else
                  f"{j.kind}: {j.model}{' at ' + j.base_url if j.base_url else ''}; scores read as "
                  f"{j.scoring} ({j.scoring_reason})")
        if cost is not None:
            from emq.judge.estimate import estimate_text

            t.add_row("  cost (estimate)" if len(judges) > 1 else "judge cost (estimate)", estimate_text(cost))
        if outlook is not None:
            t.add_row("  validation" if len(judges) > 1 else "judge validation", validation_outlook_text(outlook))
    for r in plan.reasons:
        t.add_row("why", r)
    return render(t)


def summary_table(rows: list[tuple[str, str]], title: str) -> str:
    t = Table(title=title, show_header=False)
    t.add_column("", style="bold", no_wrap=True)
    t.add_column("", overflow="fold")
    for k, v in rows:
        t.add_row(k, v)
    return render(t)


def _ci(s: dict[str, Any] | None, pct: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "n/a (nothing scored)"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.1f}")
    ci = f" [{f(s['ci95'][0])}, {f(s['ci95'][1])}]" if s.get("ci95") else ""
    return f"{f(s['mean'])}{ci}  (n={s['n']}, {s['questions']} questions)"


def validation_text(v: dict[str, Any], min_auroc: float | None = None) -> str:
    """A judge validation record in one line: per metric AUROC and Spearman, flagged where the judge cannot tell
    good from bad (AUROC below judge.min_auroc)."""
    limit = v.get("min_auroc") if min_auroc is None else min_auroc
    parts = []
    for m, r in (v.get("metrics") or {}).items():
        auroc = "n/a" if r.get("auroc") is None else f"{r['auroc']:.2f}"
        rho = "" if r.get("spearman") is None else f", Spearman {r['spearman']:.2f}"
        weak = r.get("testable") and (r.get("auroc") is None or (limit is not None and r["auroc"] < limit))
        parts.append(f"{m} AUROC {auroc}{rho}" + (f" ← this judge cannot tell {r.get('auroc_of')} apart"
                                                   if weak else ""))
    where = (v.get("set") or {}).get("source", "?")
    return "; ".join(parts) + f" (judge.min_auroc {limit:g}; {(v.get('set') or {}).get('items', '?')} items of {where})"


def validation_outlook_text(o: dict[str, Any]) -> str:
    """The plan's line on validation: a result already known for this judge (with its warnings), or that one
    runs in the judge stage."""
    if o.get("known"):
        when = o["known"].get("when", "earlier")
        text = f"known from {when}: " + validation_text(o["known"], o.get("min_auroc"))
        if o.get("cannot_tell_apart"):
            text = "WARNING: " + text
        return text + ("; the set is judged again only where scores are missing" if o.get("validate") else "")
    return f"runs in the judge stage: {o.get('items')} labelled items of {o.get('set')}"


def judge_cost_text(j: dict[str, Any]) -> str:
    """What judging a run cost: judgements asked and from the cache, requests, tokens, the price's cost."""
    cached, asked = j.get("cached", 0), j.get("judged_now", 0)
    text = (f"{asked} judged now, {cached} from the judge cache"
            + (f" ({100 * cached / (cached + asked):.0f}% hits)" if cached + asked else "")
            + f", {j.get('reused', 0)} already in the run; {j.get('requests', 0)} requests, "
            f"{j.get('prompt_tokens', 0):,} prompt + {j.get('completion_tokens', 0):,} completion tokens"
            + (f" in {j['batches']} batch(es) (judge.batch)" if j.get("batches") else "")
            + (f", {j['batch_resumed']} answers from a batch an interrupted run submitted"
               if j.get("batch_resumed") else ""))
    return text + (f", cost {j['cost']:.4f} (judge.price)" if j.get("cost") is not None else "")


def judged_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    j = metrics.get("judge") or {}
    if j.get("kind") and j["kind"] != "none":
        rows.append(("judge", f"{j['kind']} {j.get('model')} (scoring: {j.get('scoring')}; "
                              f"{j.get('judged_per_second', 0)} judgements/s)"))
        if j.get("items") is not None:
            rows.append(("judge cost", judge_cost_text(j)))
    for m, s in (metrics.get("metrics") or {}).items():
        rows.append((f"{m} (mean, 95% CI)", _ci(s) + (f", unscored {100 * s['unscored_rate']:.0f}%"
                                                      if s.get("unscored_rate") else "")))
    em = metrics.get("em") or {}
    if em:
        rows.append(("misaligned rate", _ci(em.get("misaligned_rate"), pct=True)))
        rows.append(("coherent rate", _ci(em.get("coherent_rate"), pct=True)))
        rows.append(("refusal rate", _ci(em.get("refusal_rate"), pct=True)))
        if em.get("unscored_rate") is not None:
            rows.append(("unscored judgements", f"{100 * em['unscored_rate']:.1f}%"))
    if j.get("validation"):
        rows.append(("judge validation", validation_text(j["validation"])))
    judges = metrics.get("judges") or {}
    if len(judges) > 1:  # every judge that scored these answers, and how far they agree
        for label, entry in judges.items():
            means = ", ".join(f"{m} {_ci(s)}" for m, s in (entry.get("metrics") or {}).items())
            rate = ((entry.get("em") or {}).get("misaligned_rate"))
            checked = ((entry.get("judge") or {}).get("validation") or {}).get("metrics") or {}
            auroc = ", ".join(f"{m} {v['auroc']:.2f}" for m, v in checked.items() if v.get("auroc") is not None)
            rows.append((f"judge {label}", means + (f"; misaligned {_ci(rate, pct=True)}" if rate else "")
                         + (f"; validation AUROC {auroc}" if auroc else "")))
            if (entry.get("judge") or {}).get("items") is not None:
                rows.append(("  its cost", judge_cost_text(entry["judge"])))
        for pair in metrics.get("agreement") or []:
            rows.append(("judge agreement", agreement_text(pair)))
    return rows


def agreement_text(pair: dict[str, Any]) -> str:
    """One pair of judges in a line: Spearman per metric, Cohen's kappa on the misaligned classification."""
    a, b = pair["judges"]
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    rho = ", ".join(f"{m} ρ {fmt(v['spearman'])} (n {v['n']})" for m, v in pair["metrics"].items())
    mis = pair["misaligned"]
    agree = "" if mis["agree"] is None else f", agree {100 * mis['agree']:.0f}%"
    return f"{a} vs {b}: {rho}; misaligned κ {fmt(mis['kappa'])}{agree} (n {mis['n']})"


def run_summary_rows(status, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The end-of-run summary: status, route, speed, memory, judged means with CIs, fidelity."""
    rows = [("status", status.status), ("stage", status.stage), ("route", str(status.route))]
    if status.error:
        rows.append(("error", status.error))
    for k in ("quant", "dtype", "count", "mean_output_tokens", "tokens_per_second", "latency_p95_s", "load_seconds",
              "weights_gib", "merge_seconds", "quantize_seconds"):
        if metrics.get(k) is None:
            continue
        value = str(metrics[k])
        if k == "quant" and metrics.get("quant_detail"):
            value = metrics["quant_detail"]
        elif k == "weights_gib":
            value += " (plan estimate)" if str(metrics.get("weights_source") or "").startswith("plan estimate") else \
                " (measured)"
            if metrics.get("lora_adapter_gib") is not None:  # the compensated route serves a LoRA of emq's making
                value += (f" + LoRA {metrics['lora_adapter_gib']:.3f} GiB (rank {metrics['lora_rank']}: the "
                          f"adapter's + a rank-{metrics['compensation_rank']} compensation)")
        rows.append((k, value))
    rows += judged_rows(metrics)
    fid = metrics.get("fidelity")
    if fid:
        ref = metrics.get("fidelity_reference") or {}
        rows.append(("fidelity vs trained", f"KL mean {fid['kl_mean']:.4f}, p99 {fid['kl_p99']:.4f}, top-1 agree "
                                            f"{100 * fid['top1_agreement']:.1f}%, PPL ratio {fid['ppl_ratio']:.4f} "
                                            f"({fid['positions']} tokens; reference: {ref.get('describe')})"))
    kept = metrics.get("retained")
    if kept:
        flag = "  ← this variant serves mostly the base model" if kept["mostly_base"] else ""
        top1 = f", top-1 {100 * kept['retained_top1']:.0f}%" if kept.get("retained_top1") is not None else ""
        rows.append(("fine-tune retained", f"{100 * kept['retained']:.1f}%{top1} (1 − KL to trained / KL of the base "
                                           f"without the adapter, {kept['kl_trained_vs_base']:.3f}){flag}"))
    if metrics.get("peak_vram_gib") is not None:
        rows.append(("peak VRAM (tree)", f"{metrics['peak_vram_gib']:.2f} GiB"))
    rows += [("peak RSS (tree)", f"{status.peak_rss_gib:.2f} GiB"),
             ("wall", f"{status.seconds:.1f} s: {where_time_went(status.stage_seconds, status.seconds)}"),
             ("run dir", status.run_dir)]
    return rows


STAGE_LABELS = {"load": "engine start"}  # a stage's name in status.json → how tables say it


def where_time_went(stage_seconds: dict[str, float], wall: float | None) -> str:
    """'detect 0.1 · plan 0.4 · … · other 1.2 s': each stage's wall time, in order, and what no stage covers."""
    parts = [f"{STAGE_LABELS.get(k, k)} {v:.1f}" for k, v in stage_seconds.items() if v >= 0.05]
    if wall is not None:
        parts.append(f"other {max(0.0, wall - sum(stage_seconds.values())):.1f}")
    return " · ".join(parts) + " s" if parts else ""


def run_summary(status, metrics: dict[str, Any]) -> str:
    """The end-of-run table (the run's status.json and metrics.json, as a researcher reads them)."""
    return summary_table(run_summary_rows(status, metrics), f"emq run: {status.status}")
