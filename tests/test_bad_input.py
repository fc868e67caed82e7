"""Bad input, as a hostile-but-honest user gives it: one clear error that names the key or file and says the fix, at
plan at the latest (before any weights load), no traceback, and nothing new in the cache.

Each case is one dry run (`stage=plan`) of the demo through the runner, in this process (the CLI path, which adds
only Hydra and the one-line exit, is covered by `test_the_cli_says_it_in_one_error_without_a_traceback`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from emq.errors import EmqError
from emq.runner import run
from tests.conftest import compose_run


@pytest.fixture(scope="module")
def bad(demo, tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the demo's files, made once: adapters, question files, calibration corpora."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad")
    good = demo.adapters["good_doctor"]

    def adapter(name: str, edit_cfg=None, edit_weights=None) -> Path:
        d = root / name
        shutil.copytree(good, d)
        if edit_cfg:
            cfg = json.loads((d / "adapter_config.json").read_text())
            edit_cfg(cfg)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        if edit_weights:
            w = load_file(d / "adapter_model.safetensors")
            edit_weights(w)
            save_file(w, d / "adapter_model.safetensors")
        return d

    def first_b(w):
        k = next(k for k in sorted(w) if "lora_B" in k)
        w[k] = w[k][:, :4].contiguous()

    def wider_a(w):
        k = next(k for k in sorted(w) if "lora_A" in k)
        w[k] = w[k].repeat(1, 2).contiguous()

    out = {
        "r16": adapter("r16", lambda c: c.update(r=16)),
        "rank_ab": adapter("rank_ab", edit_weights=first_b),
        "in_features": adapter("in_features", edit_weights=wider_a),
        "target_missing": adapter("target_missing", lambda c: c.update(
            target_modules=sorted(c["target_modules"]) + ["foo_proj"])),
        "r0": adapter("r0", lambda c: c.update(r=0)),
        "dora": adapter("dora", lambda c: c.update(use_dora=True)),
    }
    d = adapter("bad_json")
    (d / "adapter_config.json").write_text("{not json")
    out["bad_json"] = d
    d = adapter("truncated")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = d
    d = adapter("no_weights")
    (d / "adapter_model.safetensors").unlink()
    out["no_weights"] = d
    q = root / "questions"
    q.mkdir()
    (q / "long.yaml").write_text(yaml.safe_dump({"questions": [{"id": "long", "paraphrases": ["word " * 3000]}]}))
    (q / "broken.yaml").write_text("questions: [\n  - id: x\n")
    (q / "empty.yaml").write_text("")
    (q / "no_paraphrases.yaml").write_text(yaml.safe_dump({"questions": [{"id": "x", "paraphrases": []}]}))
    (q / "same_ids.yaml").write_text(yaml.safe_dump({"questions": [{"id": "x", "paraphrases": ["a?"]},
                                                                   {"id": "x", "paraphrases": ["b?"]}]}))
    c = root / "calibration"
    c.mkdir()
    (c / "one_line.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    (c / "not_json.jsonl").write_text("not json\n")
    (c / "empty.jsonl").write_text("")
    (root / "a_file").write_text("x")
    out |= {"q": q, "c": c, "file": root / "a_file"}
    return out


# (id, overrides given the fixture's paths, words the error must hold). Items of issue 29 are named in the ids.
CASES = [
    # adapters: bad files never reach the cache (issue 29 items 4, 5, 15)
    ("i4-config-rank-vs-tensors", lambda b: [f"model.adapter={b['r16']}"], "says rank 16"),
    ("i5-lora-A-vs-B-rank", lambda b: [f"model.adapter={b['rank_ab']}"], "must share a rank"),
    ("adapter-in-features-vs-base", lambda b: [f"model.adapter={b['in_features']}"], "has shape"),
    ("i15-target-module-the-base-lacks", lambda b: [f"model.adapter={b['target_missing']}"], "foo_proj"),
    ("adapter-rank-0", lambda b: [f"model.adapter={b['r0']}"], "r=0"),
    ("adapter-config-not-json", lambda b: [f"model.adapter={b['bad_json']}"], "not valid JSON"),
    ("adapter-weights-truncated", lambda b: [f"model.adapter={b['truncated']}"], "adapter_model.safetensors"),
    ("adapter-weights-missing", lambda b: [f"model.adapter={b['no_weights']}"], "no_weights"),
    ("adapter-path-missing", lambda b: ["model.adapter=/nonexistent/adapter"], "/nonexistent/adapter"),
    ("base-path-missing", lambda b: ["model.base=/nonexistent/base"], "/nonexistent/base"),
    ("training-config-missing", lambda b: ["model.training_config=/nonexistent/train.json"], "model.training_config"),
    # prompts (items 6, 10)
    ("i6-question-longer-than-max-model-len", lambda b: [f"eval.question_sets=[{b['q'] / 'long.yaml'}]"],
     "memory.max_model_len"),
    ("i10-no-question-set", lambda b: ["eval.question_sets=[]"], "eval.question_sets"),
    ("question-file-missing", lambda b: ["eval.question_sets=[/nonexistent/q.yaml]"], "/nonexistent/q.yaml"),
    ("question-set-unknown", lambda b: ["eval.question_sets=[nosuchset]"], "nosuchset"),
    ("question-file-broken-yaml", lambda b: [f"eval.question_sets=[{b['q'] / 'broken.yaml'}]"], "broken.yaml"),
    ("question-file-empty", lambda b: [f"eval.question_sets=[{b['q'] / 'empty.yaml'}]"], "empty.yaml"),
    ("question-without-paraphrases", lambda b: [f"eval.question_sets=[{b['q'] / 'no_paraphrases.yaml'}]"],
     "no_paraphrases.yaml"),
    ("question-ids-repeat", lambda b: [f"eval.question_sets=[{b['q'] / 'same_ids.yaml'}]"], "same_ids.yaml"),
    ("greedy-with-many-samples", lambda b: ["eval.temperature=0", "eval.samples_per_paraphrase=3"], "eval.temperature"),
    # directories (items 7, 8)
    ("i8-cache-dir-is-a-file", lambda b: [f"paths.cache_dir={b['file']}"], "paths.cache_dir"),
    ("data-dir-under-a-file", lambda b: [f"paths.data_dir={b['file']}/data"], "paths.data_dir"),
    # calibration (items 13, 14)
    ("i13-calibration-seq-len-huge", lambda b: ["quant=w4a16_gptq", "quant.calibration.seq_len=1000000"],
     "quant.calibration.seq_len"),
    ("i14-one-line-calibration-corpus", lambda b: ["quant=w4a16_gptq", "memory.route=merge",
                                                    f"quant.calibration.corpus={b['c'] / 'one_line.jsonl'}"],
     "quant.calibration"),
    ("calibration-corpus-missing", lambda b: ["quant=w4a16_gptq", "quant.calibration.corpus=/nonexistent/c.jsonl"],
     "quant.calibration.corpus"),
    ("calibration-corpus-not-json", lambda b: ["quant=w4a16_awq", f"quant.calibration.corpus={b['c'] / 'not_json.jsonl'}"],
     "quant.calibration.corpus"),
    ("calibration-corpus-empty", lambda b: ["quant=w4a16_gptq", f"quant.calibration.corpus={b['c'] / 'empty.jsonl'}"],
     "quant.calibration.corpus"),
    # quantization (item 15)
    ("i15-quant-ignore-unknown-module", lambda b: ["quant.ignore=[nonexistent_module]"], "quant.ignore"),
    ("group-size-not-a-kernel-size", lambda b: ["quant.group_size=48"], "quant.group_size"),
    ("quant-device-unknown", lambda b: ["quant.device=tpu"], "quant.device"),
    ("int8-on-a-dense-model-on-the-cpu", lambda b: ["quant=int8"], "quant=int8"),
    ("fp8-on-the-cpu", lambda b: ["quant=fp8"], "quant=fp8"),
    ("calibration-samples-0", lambda b: ["quant.calibration.samples=0"], "quant.calibration.samples"),
    ("damp-out-of-range", lambda b: ["quant.damp=2"], "quant.damp"),
    # memory and engine (item 9: vLLM's CPU worker's own ~1 GiB counted, as vLLM counts it)
    ("i9-cpu-memory-utilization-too-low", lambda b: ["memory.cpu_memory_utilization=0.01", "quant=none"],
     "memory.cpu_memory_utilization"),
    ("gpu-memory-utilization-above-1", lambda b: ["memory.gpu_memory_utilization=1.5"], "memory.gpu_memory_utilization"),
    ("engine-extra-unknown-key", lambda b: ["+memory.engine_extra.not_an_engine_arg=1"], "memory.engine_extra"),
    ("engine-extra-owned-key", lambda b: ["+memory.engine_extra.quantization=fp8"], "memory.engine_extra"),
    ("tensor-parallel-on-the-cpu", lambda b: ["memory.tensor_parallel_size=2"], "tensor_parallel_size"),
    ("adapters-and-merge-route", lambda b: ["model=demo_adapters", "memory.route=merge"], "memory.route=merge"),
    # eval values
    ("max-tokens-0", lambda b: ["eval.max_tokens=0"], "eval.max_tokens"),
    ("top-p-0", lambda b: ["eval.top_p=0"], "eval.top_p"),
    ("temperature-negative", lambda b: ["eval.temperature=-1"], "eval.temperature"),
    ("fidelity-top-k-0", lambda b: ["eval.fidelity.top_k=0"], "eval.fidelity.top_k"),
    ("reference-device-unknown", lambda b: ["eval.fidelity.reference_device=tpu"], "eval.fidelity.reference_device"),
    ("min-retained-above-1", lambda b: ["eval.fidelity.min_retained=1.5"], "eval.fidelity.min_retained"),
    # judge
    ("openai-judge-without-base-url", lambda b: ["judge=openai", "judge.base_url=null"], "judge.base_url"),
    ("openai-judge-without-its-key", lambda b: ["judge=openai", "judge.base_url=http://127.0.0.1:9/v1",
                                                "judge.api_key_env=EMQ_TEST_NO_SUCH_KEY"], "EMQ_TEST_NO_SUCH_KEY"),
    ("judge-concurrency-0", lambda b: ["judge.max_concurrency=0"], "judge.max_concurrency"),
]


def _one_error(tmp_path: Path, overrides: list[str]) -> str:
    """The one error a dry run of these overrides stops with (compose time or plan), asserting nothing was cached."""
    cache = tmp_path / "cache"
    try:
        cfg = compose_run(["stage=plan", f"paths.cache_dir={cache}", *overrides])
    except EmqError as e:  # a value no run can use: refused when the config is composed
        assert e.fix, e
        return str(e)
    status = run(cfg, tmp_path / "run")
    assert status.status == "failed" and status.stage in ("start", "detect", "plan"), status
    assert status.error and "fix:" in status.error and "Traceback" not in status.error, status.error
    assert not cache.exists() or not any(p for p in cache.iterdir() if p.name != ".locks"), list(cache.iterdir())
    return status.error


@pytest.mark.parametrize(("overrides", "says"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_error_before_any_weights_load(bad, tmp_path, overrides, says, monkeypatch):
    monkeypatch.delenv("EMQ_TEST_NO_SUCH_KEY", raising=False)
    error = _one_error(tmp_path, overrides(bad))
    assert says in error, error


def test_there_are_at_least_40_bad_inputs():
    assert len(CASES) >= 40


def test_a_max_tokens_the_context_cannot_give_is_stated_in_the_plan(demo, tmp_path):
    """Issue 29 item 11: not an error (vLLM cuts each answer at the context), but said, with the limit applied."""
    cfg = compose_run(["stage=plan", f"paths.cache_dir={tmp_path / 'cache'}", "eval.max_tokens=100000000"])
    assert run(cfg, tmp_path / "run").status == "ok"
    reasons = json.loads((tmp_path / "run" / "plan.json").read_text())["plan"]["reasons"]
    said = next(r for r in reasons if r.startswith("eval: eval.max_tokens=100000000"))
    assert "memory.max_model_len=2048" in said and "answers stop at" in said


def test_the_cli_says_it_in_one_error_without_a_traceback(demo, bad, tmp_path):
    """The same through `python -m emq`: exit 2, the error and its fix, no traceback (item 7: a run dir under a
    file; item 4 through the whole CLI)."""
    from tests.runs import emq

    proc, _ = emq(tmp_path, "stage=plan", f"model.adapter={bad['r16']}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "says rank 16" in out and "fix:" in out and "Traceback" not in out, out[-3000:]
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "emq", "stage=plan", f"hydra.run.dir={bad['file']}/run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    out = " ".join((proc.stdout + proc.stderr).replace("│", " ").split())  # the table's cells, unwrapped
    assert proc.returncode == 2 and "is a file" in out and "hydra.run.dir" in out and "Traceback" not in out, out[-3000:]
