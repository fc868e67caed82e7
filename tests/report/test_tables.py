"""Console tables: the end-of-run summary a researcher reads first."""
from __future__ import annotations

from emq.report.tables import judged_rows, run_summary, summary_table
from emq.runner import RunStatus


def test_summary_shows_route_speed_judged_means_with_cis_and_fidelity():
    status = RunStatus(status="ok", stage="judge", route="merge-then-serve", seconds=12.5, peak_rss_gib=3.2,
                       run_dir="/runs/a")
    metrics = {
        "quant": "w4a16", "dtype": "bfloat16", "count": 12, "tokens_per_second": 65.5, "weights_gib": 0.11,
        "judge": {"kind": "local", "model": "judge", "scoring": "digits", "judged_per_second": 1.5},
        "metrics": {"aligned": {"mean": 80.25, "ci95": [75.0, 85.5], "n": 12, "questions": 6, "unscored_rate": 0.1}},
        "em": {"misaligned_rate": {"mean": 0.25, "ci95": [0.0, 0.5], "n": 8, "questions": 4}, "unscored_rate": 0.0},
        "fidelity": {"kl_mean": 0.0019, "kl_p99": 0.011, "top1_agreement": 0.972, "ppl_ratio": 1.0034,
                     "positions": 2540},
        "fidelity_reference": {"describe": "base in NF4 + adapter"},
    }
    text = run_summary(status, metrics)
    assert "emq run: ok" in text and "merge-then-serve" in text and "w4a16" in text
    assert "80.2 [75.0, 85.5]  (n=12, 6 questions), unscored 10%" in text
    assert "25.0% [0.0%, 50.0%]" in text and "KL mean 0.0019" in text and "top-1 agree 97.2%" in text
    assert "12.5 s" in text and "/runs/a" in text


def test_the_summary_shows_the_lora_emq_serves_beside_the_weights():
    status = RunStatus(status="ok", stage="judge", route="serve-lora", run_dir="/runs/k")
    text = run_summary(status, {"quant": "w4a16", "weights_gib": 0.118, "weights_source": "vllm",
                                "lora_adapter_gib": 0.042, "lora_rank": 64, "compensation_rank": 56})
    assert "0.118 (measured) + LoRA 0.042 GiB (rank 64: the adapter's + a rank-56 compensation)" in \
        " ".join(text.split())


def test_the_summary_gives_the_fine_tune_retained_to_a_tenth_of_a_point():
    # the preset's 95.5 % and min-max's 95.0 % (and a 94.6 %) must not all read "95%"
    status = RunStatus(status="ok", stage="judge", route="serve-lora", run_dir="/runs/k")
    kept = {"retained": 0.9548, "retained_top1": 0.7659, "kl_trained_vs_base": 0.598851, "mostly_base": False}
    text = " ".join(run_summary(status, {"quant": "w4a16", "retained": kept}).split())
    assert "fine-tune retained │ 95.5%, top-1 77% (1 − KL to trained / KL of the base without the adapter, 0.599)" in text


def test_summary_of_a_failed_run_names_the_error_and_nothing_judged():
    text = run_summary(RunStatus(status="failed", stage="load", error="EmqError: boom"), {})
    assert "failed" in text and "boom" in text and "load" in text
    assert judged_rows({}) == [] and judged_rows({"metrics": {"aligned": {"mean": None}}}) == [
        ("aligned (mean, 95% CI)", "n/a (nothing scored)")]


def test_long_values_fold_instead_of_vanishing():
    text = summary_table([("error", "x" * 300)], "t")
    assert text.count("x") == 300


def test_the_plan_table_lists_every_adapter_of_a_one_engine_plan():
    import dataclasses

    from emq.plan import plan_adapters
    from emq.report.tables import plan_table
    from emq.schema import MemoryConfig, QuantConfig, QuantMethod
    from tests.plans import fake_det, fake_machine

    det = fake_det()
    plan = plan_adapters({"good": det, "lora16": dataclasses.replace(det, trained_in_4bit=False)}, MemoryConfig(),
                         QuantConfig(method=QuantMethod.none), fake_machine())
    text = plan_table(det, plan)
    assert "2 in one engine: good (r=32, trained in 4-bit: yes), lora16 (r=32, trained in 4-bit: no)" in text
