"""emq.quant_utils: the original tool's quant_utils, driven with the original scripts' call patterns.

The fast tests check signatures, the routing semantics, errors and the cache; the slow test runs
tests/data/original_scripts/doctor_eval.py (the original's call sites, only the import lines changed) in real
processes, its returned paths served by a real vLLM CPU engine with the original's own LLM(...) settings.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emq import quant_utils
from emq.checkpoint.cache import entries
from emq.errors import EmqError
from emq.machine import snapshot
from emq.schema import QuantMethod

# The original's signatures (eval/quant_utils.py), copied as patterns: name, parameters in order, defaults. The
# README's `quantize_to_awq(..., desc_act=False, fp16=True)` keywords come after them.
ORIGINAL = {
    "was_trained_in_4bit": "(model_id: str, config_path: Optional[str] = None) -> bool",
    "merge_lora_adapter": "(base_model: str, lora_model: str, output_path: str, device_map: str = 'auto', "
                          "save_tokenizer: bool = True, use_cpu: bool = False) -> str",
    "quantize_to_awq": "(model_path: str, output_path: str, bits: int = 4, group_size: int = 128, "
                       "zero_point: bool = True, version: str = 'GEMM', awq_version: Optional[str] = None, *, "
                       "desc_act: bool = False, fp16: bool = True) -> str",
    "check_vram_capacity": "() -> float",
    "check_system_ram": "() -> float",
    "get_or_create_merged_model": "(base_model: str, lora_model: str, force_recreate: bool = False, "
                                  "use_cpu: bool = False) -> str",
    "prepare_model_for_vllm": "(model_id: str, use_quantization: bool = True, stop_on_failure: bool = True) -> str",
    "cleanup_model_cache": "() -> None",
}
CLI_KEY = re.compile(r"\b(model|quant|memory|eval|judge|paths)\.[a-z_]+|model=demo")
SCRIPT = Path(__file__).parent / "data" / "original_scripts" / "doctor_eval.py"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """emq's checkpoint cache for this test alone (cleanup_model_cache empties the whole cache)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("EMQ_CACHE", str(root))
    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_INT4_W4A8"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(quant_utils, "_ADVISED", set())  # advice is said once per process
    return root


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_signatures_are_the_originals(name):
    sig = str(inspect.signature(getattr(quant_utils, name))).replace("'Optional[str]'", "Optional[str]")
    sig = re.sub(r"'([^']*)'", lambda m: m.group(0) if m.group(1) in ("auto", "GEMM") else m.group(1), sig)
    assert sig == ORIGINAL[name]


def test_the_original_import_lines_work():
    namespace: dict = {}
    exec(textwrap.dedent("""
        from emq.quant_utils import prepare_model_for_vllm, was_trained_in_4bit, cleanup_model_cache
        from emq.quant_utils import (was_trained_in_4bit, prepare_model_for_vllm, get_or_create_merged_model)
        from emq.quant_utils import quantize_to_awq, get_or_create_awq_model, merge_lora_adapter
        from emq.quant_utils import check_vram_capacity, check_system_ram
        from emq.memory_config import check_vram_capacity, get_memory_config, generate_config_file, main
    """), namespace)
    assert callable(namespace["get_or_create_awq_model"]) and callable(namespace["main"])


def test_was_trained_in_4bit(demo, cache):
    good, lora16 = str(demo.adapters["good_doctor"]), str(demo.adapters["lora16"])
    assert quant_utils.was_trained_in_4bit(good) is True
    assert quant_utils.was_trained_in_4bit(lora16) is False
    assert quant_utils.was_trained_in_4bit(str(demo.base)) is False  # a model: its config has no quantization_config
    assert quant_utils.was_trained_in_4bit(good, str(demo.adapters["good_doctor"] / "training_config.json")) is True
    with pytest.raises(EmqError, match="config_path") as e:
        quant_utils.was_trained_in_4bit(good, "/nonexistent/training_config.json")
    assert not CLI_KEY.search(str(e.value))


def test_prepare_returns_model_id_unchanged_when_it_would_not_merge(demo, cache):
    lora16, good, base = str(demo.adapters["lora16"]), str(demo.adapters["good_doctor"]), str(demo.base)
    assert quant_utils.prepare_model_for_vllm(lora16, True, True) == lora16  # not trained in 4-bit
    assert quant_utils.prepare_model_for_vllm(good, use_quantization=False) == good
    assert quant_utils.prepare_model_for_vllm(base, True, True) == base  # a full model
    assert not entries(cache)  # nothing was merged


def test_prepare_merges_a_qlora_adapter_for_inflight_bnb(demo, cache, caplog):
    good = str(demo.adapters["good_doctor"])
    with caplog.at_level(logging.WARNING):
        path = quant_utils.prepare_model_for_vllm(good, True, True)  # the original's positional call
    assert type(path) is str and path != good and Path(path).parent == cache
    config = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in config  # 16-bit: the caller's quantization="bitsandbytes" quantizes it
    assert "rounds a fine-tune's small update" in caplog.text  # the plan's warning about merged + bnb reaches the user
    machine = snapshot(cache)
    if machine.vllm.platform == "cpu":  # the caller's gpu_memory_utilization=0.9 would reserve 90 % of the node
        assert int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) >= 1
        assert "enforce_eager=True" in caplog.text
    assert quant_utils.prepare_model_for_vllm(good, True, True) == path  # cached


def test_a_value_the_user_set_wins(demo, cache, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    quant_utils.prepare_model_for_vllm(str(demo.base))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_merge_lora_adapter_writes_output_path_once(demo, cache, tmp_path):
    base, good, bad = str(demo.base), str(demo.adapters["good_doctor"]), str(demo.adapters["bad_doctor"])
    out = tmp_path / "merged"
    assert quant_utils.merge_lora_adapter(base, good, str(out)) == str(out)
    (entry,) = entries(cache)
    shard = next(out.glob("*.safetensors"))
    assert shard.stat().st_nlink >= 2 or shard.stat().st_size == (entry.path / shard.name).stat().st_size
    assert quant_utils.merge_lora_adapter(base, good, str(out), use_cpu=True) == str(out)  # the same: a no-op
    with pytest.raises(EmqError, match="output_path=") as e:  # something else there: never overwritten
        quant_utils.merge_lora_adapter(base, bad, str(out))
    assert not CLI_KEY.search(str(e.value))
    assert not list(tmp_path.glob(".merged.tmp-*"))


@pytest.mark.parametrize("call, names", [
    (lambda d: quant_utils.get_or_create_merged_model(str(d.base), str(d.base)), "lora_model="),
    (lambda d: quant_utils.get_or_create_merged_model(str(d.base), "/nonexistent/adapter"), "lora_model"),
    (lambda d: quant_utils.quantize_to_awq(str(d.base), "/tmp/never", bits=8), "bits=8"),
    (lambda d: quant_utils.quantize_to_awq(str(d.base), "/tmp/never", group_size=96), "group_size=96"),
    (lambda d: quant_utils.prepare_model_for_vllm("/nonexistent/model"), "model_id"),
    (lambda d: quant_utils.get_or_create_awq_model(str(d.base), str(d.base)), "lora_model="),
])
def test_errors_name_the_parameter(demo, cache, call, names):
    with pytest.raises(EmqError) as e:
        call(demo)
    text = str(e.value)
    assert names in text and not CLI_KEY.search(text), text
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback of emq's internals
    assert not list(Path("/tmp").glob("never*"))


def test_the_original_default_group_size_adapts_to_the_model(demo, caplog):
    # SmolLM2's in-features (576, 1536) take 64 and 32, not the original's default 128
    with caplog.at_level(logging.WARNING):
        assert quant_utils._group_size(str(demo.base), None, 128, "model_path") == 64
    assert "group_size=128 does not divide" in caplog.text
    assert quant_utils._group_size(str(demo.base), None, 32, "model_path") == 32  # given: used as given


def test_awq_only_options_warn_and_say_what_emq_does(caplog):
    with caplog.at_level(logging.WARNING):
        quant_utils._awq_options(4, "GEMV", None, True, False)
    assert "version='GEMV'" in caplog.text and "desc_act" in caplog.text and "fp16=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        quant_utils._awq_options(4, "GEMM", None, False, True)  # the defaults mean nothing to warn about
    assert not caplog.text


def test_check_vram_and_ram_return_floats():
    vram, ram = quant_utils.check_vram_capacity(), quant_utils.check_system_ram()
    assert isinstance(vram, float) and isinstance(ram, float) and ram > 0
    assert (vram > 0) == bool(snapshot(Path.home()).gpus)


HOLDER = """
import sys, time
from emq.api import get_or_create_merged_model
get_or_create_merged_model(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], device="cpu")
print("held", flush=True)
time.sleep(120)
"""


def test_cleanup_model_cache_empties_the_cache_but_not_what_another_process_uses(demo, cache, caplog):
    base = str(demo.base)
    quant_utils.get_or_create_merged_model(base, str(demo.adapters["good_doctor"]))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, base, str(demo.adapters["bad_doctor"]), str(cache)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert len(entries(cache)) == 2
        with caplog.at_level(logging.INFO, logger="emq.quant_utils"):
            assert quant_utils.cleanup_model_cache() is None
        (left,) = entries(cache)  # the entry the other process is using is still there
        assert "bad_doctor" in left.adapter
        assert re.search(r"removed 1 checkpoint\(s\), 0\.\d\d GiB freed", caplog.text)
        assert "another process is building or using it" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    quant_utils.cleanup_model_cache()  # its holder is gone: now it goes
    assert entries(cache) == []


def _run(demo, out: Path, step: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(demo.root), str(out), step], capture_output=True,
                          text=True, env=env, timeout=1500)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_the_original_script_runs_against_emq_unchanged(demo, tmp_path):
    """The original's call sites, import lines changed only: detect, merge (first, cached, force_recreate, use_cpu),
    prepare with positional arguments, quantize_to_awq with the original keywords, get_or_create_awq_model, the
    returned paths served by vLLM with the original settings, check_vram_capacity/check_system_ram, cleanup."""
    env = {**os.environ, "EMQ_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    r = _run(demo, out, "prepare", env)
    assert r["types"] == ["str"] and r["trained"] == [True, False, True]
    assert r["merged"] == r["again"] == r["forced"] == r["prepared"] and r["cached_s"] < r["first_s"]
    assert r["exported"] == str(out / "merged") and r["unchanged"].endswith("lora16")
    assert r["no_quant"] == str(demo.adapters["good_doctor"])
    assert r["awq"] == r["awq_again"] == str(out / "awq") and isinstance(r["vram_gb"], float) and r["ram_gb"] > 0
    awq_config = json.loads((out / "awq" / "config.json").read_text())["quantization_config"]
    assert awq_config["format"] == "pack-quantized"
    assert awq_config["config_groups"]["group_0"]["weights"]["group_size"] == 64  # 128 adapted to the demo's 576
    # quantize_to_awq of the cached merge and get_or_create_awq_model(base, lora) are one checkpoint, made once
    assert json.loads((out / "awq" / "manifest.json").read_text())["key"] == Path(r["direct"]).name

    served = _run(demo, out, "serve_merged", env)  # doctor_eval: LLM(prepared, quantization="bitsandbytes", ...)
    assert served["model"] == r["prepared"] and len(served["text"].split()) >= 5
    assert int(served["env"]["VLLM_CPU_KVCACHE_SPACE"]) >= 1
    if QuantMethod.w4a16 in snapshot(tmp_path).vllm.quant:  # the AWQ checkpoint as it is: LLM(model=awq_path)
        awq = _run(demo, out, "serve_awq", env)
        assert awq["model"] == r["direct"] and len(awq["text"].split()) >= 5
    else:  # no int4 kernel in this vLLM (the CPU build on an AVX2 CPU): the LoRA branch, enable_lora=True
        lora = _run(demo, out, "serve_lora", env)
        assert lora["model"] == str(demo.adapters["good_doctor"]) and len(lora["text"].split()) >= 5

    assert _run(demo, out, "cleanup", env) == {"step": "cleanup"}
    assert entries(tmp_path / "cache") == []
    assert (out / "awq" / "config.json").is_file()  # output_path copies are the caller's: kept


def test_errors_keep_paths_intact(demo, cache):
    with pytest.raises(EmqError) as e:  # "base" inside a path is not the CLI key `base`
        quant_utils.get_or_create_merged_model(str(demo.base), str(demo.base))
    assert f"lora_model={str(demo.base)!r}" in str(e.value)
