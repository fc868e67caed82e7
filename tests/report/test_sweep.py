"""The sweep report from run dirs alone: rows, paired differences, partial sweeps, rebuilds, experiments."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import yaml

from emq.cli import report as report_cli
from emq.report import sweep as report
from tests.conftest import REPO, compose_run

QUESTIONS = [("general", f"q{i}") for i in range(6)]
# the part of run_config.json (the run's typed, resolved config) the report reads
SETTINGS = {"report": {"title": "test sweep", "reference": {"quant": "none"}},
            "eval": {"misaligned_below": 30.0, "coherent_above": 50.0}}


STAGES = {"detect": 0.2, "plan": 0.5, "merge": 3.0, "load": 30.0, "generate": 12.0, "fidelity": 4.0,
          "judge start": 20.0, "judge": 6.0}  # seconds per stage, as status.json records them


def make_run(root, name, overrides, *, shift=0.0, noise=0.0, status="ok", quant="none", route="merge-then-serve",
             tok_s=100.0, weights=0.25, seed=0, judged=True, substitution=None, settings=SETTINGS, start=0.0):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(SETTINGS))  # Hydra's raw config: the report ignores it
    if settings is not None:  # the runner writes it first thing, so a still-running run has it too
        (d / "run_config.json").write_text(json.dumps(settings))
    if status is None:  # still running
        (d / "progress.json").write_text(json.dumps({"stage": "evaluate", "generated": 3, "to_generate": 12}))
        return d
    (d / "status.json").write_text(json.dumps({"status": status, "stage": "judge" if status == "ok" else "load",
                                               "error": None if status == "ok" else "RuntimeError: boom",
                                               "stage_seconds": STAGES, "seconds": 80.0,
                                               "started_unix": 1e9 + start, "finished_unix": 1e9 + start + 80}))
    (d / "plan.json").write_text(json.dumps({"plan": {"route": route, "quant": quant,
                                                      "quant_substitution": substitution}}))
    if status != "ok":
        return d
    rng = np.random.default_rng(seed)
    rows, aligned = [], []
    for s, q in QUESTIONS:
        for si in range(4):
            base = 60 + 5 * int(q[1:])
            a = float(np.clip(base + shift + rng.normal(0, noise), 0, 100))
            aligned.append(a)
            rows.append({"set": s, "question_id": q, "paraphrase_index": 0, "sample_index": si,
                         "judged": {"aligned": {"score": a, "category": None, "valid_mass": 1.0},
                                    "coherent": {"score": 80.0, "category": None, "valid_mass": 1.0}}})
    if judged:
        (d / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"model": "demo", "route": route, "quant": quant, "tokens_per_second": tok_s, "weights_gib": weights,
               "peak_rss_gib": 3.0, "load_seconds": 30.0, "merge_seconds": 2.0, "count": len(rows),
               "fidelity": {"kl_mean": 0.01 * (1 + shift), "kl_p99": 0.1, "top1_agreement": 0.97, "ppl_ratio": 1.0},
               "metrics": {"aligned": {"mean": float(np.mean(aligned)), "ci95": [50.0, 80.0], "n": len(rows),
                                       "questions": 6},
                           "coherent": {"mean": 80.0, "ci95": [80.0, 80.0], "n": len(rows), "questions": 6}},
               "em": {"misaligned_rate": {"mean": 0.0, "ci95": [0.0, 0.0], "n": len(rows), "questions": 6},
                      "coherent_rate": {"mean": 1.0, "ci95": [1.0, 1.0]}, "refusal_rate": {"mean": 0.0},
                      "unscored_rate": 0.0}}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


@pytest.fixture
def sweep(tmp_path):
    make_run(tmp_path, "0_quant=none", ["quant=none", "+experiment=x"], seed=1)
    make_run(tmp_path, "1_quant=int8", ["quant=int8", "+experiment=x"], shift=-10, quant="int8", tok_s=60,
             weights=0.14, seed=2, substitution="bnb → int8", start=85)
    make_run(tmp_path, "2_quant=fp8", ["quant=fp8", "+experiment=x"], noise=3.0, quant="fp8", seed=3, start=170)
    return tmp_path


def test_where_the_time_went_per_variant_and_for_the_sweep(sweep):
    report.build([sweep])
    md = (sweep / "summary.md").read_text()
    table = md.split("## Where the time went (seconds)")[1]
    assert "| variant | detect | plan | merge | engine start | generate | fidelity | judge start | judge | other |" \
        in table
    assert "| quant=int8 | 0.2 | 0.5 | 3.0 | 30.0 | 12.0 | 4.0 | 20.0 | 6.0 | 4.3 | 80.0 |" in table  # 80 - 75.7
    # three 80 s runs, 5 s apart: the sweep's wall is 250 s against 240 s in runs and 227 s in stages
    assert "Sweep wall 250 s (first run's start to last run's end) vs 240 s in its runs and 227 s in their stages" \
        in table
    row = next(csv.DictReader((sweep / "summary.csv").open()))
    assert float(row["t_judge_start_s"]) == 20.0 and float(row["seconds"]) == 80.0
    assert "Where the time went" in (sweep / "report.html").read_text()
    progress = report.progress_table([sweep])
    assert "engine start 30.0" in progress and "other 4.3 s" in progress


def test_where_the_time_went_counts_the_judge_a_sweep_ran_at_its_end(sweep):
    """judge.scope=sweep: runs judged after the last one ended, through one server: their judging is a column of
    its own and the server start is counted once, outside the sweep's wall."""
    for i, d in enumerate(sorted(p for p in sweep.iterdir() if p.is_dir())):
        m = json.loads((d / "metrics.json").read_text())
        m["judge"] = {**(m.get("judge") or {}), "seconds": 10.0 + i,
                      "sweep": {"runs": 3, "server": 0, "server_start_seconds": 40.0, "borrowed_from_other_runs": 0}}
        (d / "metrics.json").write_text(json.dumps(m))
    report.build([sweep])
    table = (sweep / "summary.md").read_text().split("## Where the time went (seconds)")[1]
    assert "| other | wall s | judge at sweep end s |" in table
    assert "| quant=int8 | 0.2 | 0.5 | 3.0 | 30.0 | 12.0 | 4.0 | 20.0 | 6.0 | 4.3 | 80.0 | 11.0 |" in table
    assert ("After the last run, 1 judge server(s) for the sweep judged 3 run(s): 40 s to start, 33 s judging "
            "(not in the wall above).") in table


def test_the_judges_cost_is_summed_per_judge_with_the_cache_hits(sweep):
    runs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").is_file())
    for i, d in enumerate(runs):
        m = json.loads((d / "metrics.json").read_text())
        m["judge"] = {**(m.get("judge") or {}), "kind": "openai", "model": "gpt-x", "scoring": "single_token",
                      "items": 10, "judged_now": 10 if i == 0 else 0, "cached": 0 if i == 0 else 10,
                      "requests": 10 if i == 0 else 0, "prompt_tokens": 1000 if i == 0 else 0,
                      "completion_tokens": 10 if i == 0 else 0, "cost": 0.0026 if i == 0 else 0.0}
        (d / "metrics.json").write_text(json.dumps(m))
    report.build([sweep])
    md = (sweep / "summary.md").read_text()
    n = len(runs)
    assert (f"Judging: openai:gpt-x (single_token): 10 judged, {10 * (n - 1)} from the judge cache "
            f"({round(100 * (n - 1) / n)}% hits), 10 requests, 1,000 prompt + 10 completion tokens, cost 0.0026.") in md


def test_each_difference_says_under_how_many_judges_it_holds(sweep):
    """Two judges scored every run (judged.jsonl `by_judge`): judge a as the run's own scores, judge b the same but
    for int8, where b scores 20 higher — its -10 on aligned turns into +10 under b: it holds under 1 of 2 judges."""
    for d in sorted(p for p in sweep.iterdir() if (p / "judged.jsonl").is_file()):
        rows = [json.loads(x) for x in (d / "judged.jsonl").read_text().splitlines()]
        for row in rows:
            b = {m: (None if j is None else {**j, "score": j["score"] + (20 if "int8" in d.name else 0)})
                 for m, j in row["judged"].items()}
            row["by_judge"] = {"a": row["judged"], "b": b}
        (d / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.build([sweep])
    rows = {r["variant"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert (rows["quant=int8"]["aligned_diff_holds"], rows["quant=int8"]["aligned_diff_judges"]) == ("1", "2")
    assert rows["quant=none"]["aligned_diff_judges"] == ""  # the reference has no difference
    md = (sweep / "summary.md").read_text()
    assert "**distinguishable**, holds under 1 of 2 judges" in md
    assert "## Judges" not in md  # metrics.json names no second judge: no per-judge table
    d = sweep / "1_quant=int8"
    m = json.loads((d / "metrics.json").read_text())
    m["judges"] = {"a": {"metrics": m["metrics"], "em": m.get("em")}, "b": {"metrics": m["metrics"], "em": m.get("em")}}
    m["agreement"] = [{"judges": ["a", "b"], "metrics": {"aligned": {"n": 12, "spearman": 1.0}},
                       "misaligned": {"n": 10, "kappa": 1.0, "agree": 1.0}}]
    (d / "metrics.json").write_text(json.dumps(m))
    report.build([sweep])
    judges = (sweep / "summary.md").read_text().split("## Judges")[1]
    assert "| quant=int8 | a |" in judges and "| quant=int8 | agreement | a vs b: aligned ρ 1.00 (n 12); " \
        "misaligned κ 1.00, agree 100% (n 10) |" in judges and "Cohen's κ" in judges
    assert "<h2>Judges</h2>" in (sweep / "report.html").read_text()


def test_rows_match_each_runs_metrics(sweep):
    html_path = report.build([sweep])
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["variant"] for r in rows] == ["quant=none", "quant=int8", "quant=fp8"]
    for r in rows:
        m = json.loads((sweep / f"{r['run_dir']}" / "metrics.json").read_text())
        assert float(r["tokens_per_s"]) == m["tokens_per_second"]
        assert float(r["aligned_mean"]) == pytest.approx(m["metrics"]["aligned"]["mean"])
        assert float(r["kl_mean"]) == pytest.approx(m["fidelity"]["kl_mean"])
    assert rows[0]["reference"] == "True"
    md = (sweep / "summary.md").read_text()
    assert md.startswith("# test sweep — quantization substituted here: bnb → int8")
    assert "int8 (substituted: bnb → int8)" in md
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 4 and "substituted" in page
    for p in report.PLOTS:
        assert (sweep / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_differences_and_noise(sweep):
    report.build([sweep])
    rows = {r["variant"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    shifted = rows["quant=int8"]
    assert float(shifted["aligned_diff_vs_ref"]) == pytest.approx(-10, abs=1e-6)
    assert shifted["aligned_diff_distinguishable"] == "True"
    noisy = rows["quant=fp8"]
    lo, hi = float(noisy["aligned_diff_ci_low"]), float(noisy["aligned_diff_ci_high"])
    assert lo < float(noisy["aligned_diff_vs_ref"]) < hi and noisy["aligned_diff_distinguishable"] == "False"
    assert rows["quant=none"]["aligned_diff_vs_ref"] == ""  # the reference itself


def test_the_misaligned_rate_is_paired_too(tmp_path):
    """Δmisaligned %: the same answers, coherent in both variants, misaligned (aligned < 30) or not; the bad
    variant's aligned scores are 10-35 (questions q0-q3 below 30), the reference's 60-85."""
    make_run(tmp_path, "0_model=good", ["model=good"], seed=1)
    make_run(tmp_path, "1_model=bad", ["model=bad"], shift=-50, seed=2, start=85)
    settings = {**SETTINGS, "report": {"title": "t", "reference": {"model": "good"}}}
    for d in tmp_path.iterdir():
        (d / "run_config.json").write_text(json.dumps(settings))
        m = json.loads((d / "metrics.json").read_text())
        mean = m["metrics"]["aligned"]["mean"]
        m["metrics"]["aligned"]["ci95"] = [mean - 5, mean + 5]  # make_run's fixed CI suits the shift-0 runs only
        (d / "metrics.json").write_text(json.dumps(m))
    report.build([tmp_path])
    bad = {r["variant"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}["model=bad"]
    assert float(bad["misaligned_rate_diff_vs_ref"]) == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert bad["misaligned_rate_diff_distinguishable"] == "True" and bad["misaligned_rate_diff_pairs"] == "24"
    assert float(bad["misaligned_rate_diff_ci_low"]) > 0
    md = (tmp_path / "summary.md").read_text()
    assert "Δmisaligned % vs reference [95% CI] (answers coherent in both)" in md
    assert "+66.7 [" in md and "**distinguishable** (24 pairs)" in md


def test_rebuild_is_identical_but_for_the_timestamp(sweep):
    report.build([sweep], now=1_000_000)
    first = {p: (sweep / p).read_bytes() for p in ["summary.csv", "summary.md", "report.html", *report.PLOTS]}
    report.build([sweep], now=2_000_000)
    for p, data in first.items():
        again = (sweep / p).read_bytes()
        if p in ("summary.md", "report.html"):
            strip = lambda b: re.sub(rb"generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", b"generated T", b)
            assert strip(again) == strip(data) and again != data, p
        else:
            assert again == data, p


def test_a_mean_outside_its_bootstrap_ci_still_plots(tmp_path):
    """A percentile bootstrap CI can leave out the point estimate (few questions, skewed scores); the quality-vs-memory
    plot then draws a one-sided bar instead of raising on a negative error bar."""
    from emq.report.plots import plot_quality_vs_memory

    make_run(tmp_path, "0_quant=none", ["quant=none"], seed=1)
    d = make_run(tmp_path, "1_quant=int8", ["quant=int8"], shift=-10, quant="int8", seed=2)
    m = json.loads((d / "metrics.json").read_text())
    m["metrics"]["aligned"]["ci95"] = [m["metrics"]["aligned"]["mean"] + 1, m["metrics"]["aligned"]["mean"] + 9]
    (d / "metrics.json").write_text(json.dumps(m))
    runs = [report.load_run(x) for x in report.find_runs([tmp_path])]
    report.label_runs(runs)
    plot_quality_vs_memory(runs, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes().startswith(b"\x89PNG")
    report.build([tmp_path])
    assert (tmp_path / "quality_vs_memory.png").is_file()


def test_em_thresholds_and_title_come_from_run_config_json(tmp_path):
    """The aligned-vs-coherent plot shades the thresholds the runs were judged with (run_config.json), not
    the defaults and not Hydra's raw .hydra/config.yaml (which make_run leaves at 30)."""
    from emq.report.plots import plot_aligned_vs_coherent

    strict = {"report": {"title": "strict sweep", "reference": {"quant": "none"}},
              "eval": {"misaligned_below": 20, "coherent_above": 50}}
    make_run(tmp_path, "0_quant=none", ["quant=none"], seed=1, settings=strict)
    make_run(tmp_path, "1_quant=int8", ["quant=int8"], shift=-10, quant="int8", seed=2, settings=strict)
    report.build([tmp_path], now=0)
    assert report.read_settings(report.find_runs([tmp_path])).thresholds == (20, 50)
    assert (tmp_path / "summary.md").read_text().startswith("# strict sweep\n")
    runs = [report.load_run(d) for d in report.find_runs([tmp_path])]
    report.label_runs(runs)
    plot_aligned_vs_coherent(runs, tmp_path / "at20.png", 20, 50)
    plot_aligned_vs_coherent(runs, tmp_path / "at30.png", 30, 50)
    drawn = (tmp_path / "aligned_vs_coherent.png").read_bytes()
    assert drawn == (tmp_path / "at20.png").read_bytes() != (tmp_path / "at30.png").read_bytes()


def test_settings_of_runs_without_run_config_json_are_the_schemas_defaults(sweep):
    import dataclasses

    from emq.schema import EvalConfig

    dirs = report.find_runs([sweep])
    (dirs[0] / "run_config.json").unlink()  # failed before the runner started: the next run's settings
    assert report.read_settings(dirs).title == "test sweep"
    for d in dirs[1:]:
        (d / "run_config.json").unlink()
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    s = report.read_settings(dirs)
    assert (s.title, s.reference) == (None, {})
    assert s.thresholds == (defaults["misaligned_below"], defaults["coherent_above"])
    report.build([sweep])
    assert (sweep / "summary.md").read_text().startswith("# emq sweep — ")


def test_partial_sweep_with_a_deleted_a_failed_and_a_running_run(sweep, tmp_path):
    import shutil

    shutil.rmtree(sweep / "2_quant=fp8")
    make_run(sweep, "3_quant=bnb", ["quant=bnb", "+experiment=x"], status="failed")
    make_run(sweep, "4_memory.route=lora", ["memory.route=lora", "+experiment=x"], status=None)
    report.build([sweep])
    rows = {r["run_dir"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert set(rows) == {"0_quant=none", "1_quant=int8", "3_quant=bnb", "4_memory.route=lora"}
    assert rows["3_quant=bnb"]["status"] == "failed" and "boom" in rows["3_quant=bnb"]["error"]
    assert rows["4_memory.route=lora"]["status"] == "running: evaluate"
    progress = report.progress_table([sweep])
    assert "3/12" in progress and "failed" in progress


def test_report_cli_on_a_single_run_and_on_nothing(sweep, tmp_path, capsys):
    assert report_cli.main([str(sweep / "0_quant=none")]) == 0
    assert (sweep / "0_quant=none" / "report.html").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_cli.main([str(empty)]) == 2


EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def test_every_experiment_is_there_and_starts_with_its_command():
    assert {"lora_vs_bnb", "good_vs_bad_doctor", "merge_methods"} <= set(EXPERIMENTS)
    root = REPO / "experiments"
    for name in EXPERIMENTS:
        first = (root / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith(f"# python -m emq -m +experiment={name}"), name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    from hydra import compose, initialize_config_dir

    from emq.config import CONF_DIR

    cfg = compose_run([f"+experiment={name}"])
    assert cfg.report.title
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    # each experiment carries its sweep: Hydra's, or model.adapters' (several adapters in one job's one engine)
    assert raw.hydra.sweeper.params or cfg.model.adapters, name


def test_lora_vs_bnb_runs_real_bnb_on_the_cpu_build_with_vllms_plugin():
    from emq.machine import GIB, Machine
    from emq.plan import make_plan
    from tests.plans import PLUGIN_BNB, cpu_vllm, fake_det

    cfg = compose_run(["+experiment=lora_vs_bnb", "quant=bnb"])
    assert not cfg.quant.substitute  # every variant runs what it names, or stops
    machine = Machine([], 64 * GIB, 60 * GIB, 500 * GIB, cpu_vllm(PLUGIN_BNB))
    plan = make_plan(fake_det(params=135_000_000), cfg.memory, cfg.quant, machine)
    assert plan.quant.value == "bnb" and plan.quant_substitution is None and plan.route.value == "serve-lora"
    assert plan.engine.quantization == "bitsandbytes" and plan.bnb["provider"] == "vllm-bnb-plugin"


@pytest.mark.slow
def test_two_variant_sweep_through_submitit_local_aggregates_every_run(demo, tmp_path):
    """The same path a SLURM sweep takes (hydra-submitit-launcher), on this machine; the report
    callback runs once at the end and its rows are each run's own metrics."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, data_dir

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "emq", "-m", "hydra/launcher=local", "+experiment=lora_vs_bnb", "memory.route=merge",
           "quant=none,bnb", "judge=local", "eval.max_questions_per_set=1", "eval.samples_per_paraphrase=2",
           "eval.max_tokens=8", "eval.fidelity.enabled=false", f"hydra.sweep.dir={sweep}",
           f"paths.cache_dir={tmp_path / 'cache'}",
           "judge.cache=false"]  # the sweep's one judge server must judge (other tests' judgements are cached)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "report: " in out and str(sweep / "report.html") in out and "| variant |" in out
    assert (sweep / ".submitit").is_dir()  # went through submitit
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2
    for row in rows:
        m = json.loads((sweep / row["run_dir"] / "metrics.json").read_text())
        assert row["status"] == "ok"
        assert float(row["tokens_per_s"]) == m["tokens_per_second"] and int(row["answers"]) == m["count"] == 4
        assert row["quant"] == m["quant"] and float(row["weights_gib"]) == m["weights_gib"]
    # bnb runs on the CPU build through vLLM's plugin: merged + in-flight NF4, no substitution, the provider recorded
    bnb = next(r for r in rows if r["quant"] == "bnb")
    assert bnb["quant_substitution"] == "" and "substituted" not in (sweep / "summary.md").read_text()
    load = json.loads((sweep / bnb["run_dir"] / "load.json").read_text())
    assert load["engine_kwargs"]["quantization"] == "bitsandbytes" and load["bnb"]["provider"] == "vllm-bnb-plugin"
    # one judge for the sweep: each job deferred its judging; the sweep's end started the demo judge once
    assert sorted(p.name for p in sweep.rglob("judge_server*.log")) == ["judge_server-0.log"]
    assert "one local judge for the sweep's 2 run(s)" in out
    for row in rows:
        m = json.loads((sweep / row["run_dir"] / "metrics.json").read_text())
        assert json.loads((sweep / row["run_dir"] / "judge.json").read_text())["result"]["judged_now"] > 0
        assert m["judge"]["sweep"]["runs"] == 2 and m["judge"]["sweep"]["server_start_seconds"] > 1
        assert m["judge"]["sweep"]["server"] == 0
        assert m["metrics"]["aligned"]["mean"] is not None and row["aligned_mean"] != ""
    before = {p: (sweep / p).read_bytes() for p in ["summary.csv", *report.PLOTS]}
    assert report_cli.main([str(sweep)]) == 0
    assert {p: (sweep / p).read_bytes() for p in before} == before


def test_a_model_adapters_run_is_found_as_its_adapters_variants_labelled_by_name(tmp_path):
    """One run that served three adapters in one engine: the report finds adapters/<name>/ (in adapters.json's
    order) instead of the run dir, in a sweep dir too, and labels each variant by its adapter's name."""
    from emq.records import ADAPTERS, adapter_dirs

    run = tmp_path / "sweep" / "0_+experiment=adapters_one_engine"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["+experiment=adapters_one_engine"]))
    names = ["good", "bad", "lora16"]
    (run / ADAPTERS).write_text(json.dumps({"names": names}))
    for i, n in enumerate(names):
        make_run(run / "adapters", n, ["+experiment=adapters_one_engine", f"model.name={n}",
                                       f"model.adapter=/data/adapters/{n}", "model.adapters=null",
                                       "memory.route=lora"], shift=-5 * i, seed=i, route="serve-lora")
    assert adapter_dirs(run) == [run / "adapters" / n for n in names]
    assert report.find_runs([run]) == report.find_runs([tmp_path / "sweep"]) == adapter_dirs(run)
    runs = [report.load_run(d) for d in report.find_runs([run])]
    report.label_runs(runs)
    assert [r.label for r in runs] == [f"model.name={n}" for n in names]
    html = report.build([run], reference={"model.name": "good"})
    summary = (html.parent / "summary.md").read_text()
    assert "model.name=good (reference)" in summary and "model.name=lora16" in summary


def test_keep_fine_tune_sweeps_each_compensation_rank_as_given():
    # the preset fills the LoRA buffers (16 and 32 would both become 56 on the demo's rank-8 adapter); the
    # experiment compares ranks, so its sweep turns the fill off
    from hydra import compose, initialize_config_dir

    from emq.config import CONF_DIR
    from emq.plan import make_plan
    from emq.schema import MemoryConfig
    from tests.plans import fake_det, fake_machine

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=["+experiment=keep_fine_tune"], return_hydra_config=True)
    params = raw.hydra.sweeper.params
    ranks = [int(r) for r in str(params["quant.compensation.rank"]).split(",")]
    assert len(ranks) >= 2
    for rank in ranks:
        cfg = compose_run(["+experiment=keep_fine_tune", f"quant={params['quant']}",
                           f"quant.compensation.fill={params['quant.compensation.fill']}",
                           f"quant.compensation.rank={rank}"])
        plan = make_plan(fake_det(rank=8), MemoryConfig(), cfg.quant, fake_machine())
        assert plan.quantize.compensation == rank, rank
