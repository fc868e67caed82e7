"""The one vLLM wrapper: what it serves is what the checkpoint holds. A W4A16 checkpoint served by vLLM's CPU
build (CPUWNA16) gives the logprobs transformers computes on the decompressed weights, within bf16 kernel noise."""
from __future__ import annotations

import numpy as np
import pytest

# Both sides compute in bf16 with different kernels (vLLM: CPUWNA16 dequantizes inside its GEMM; transformers:
# the decompressed bf16 weights), so tokens differ where two candidates are within bf16 rounding. Measured on the
# demo base (RTN asym g64, 2,540 answer tokens): KL ≈ 0.003, top-1 agreement ≈ 0.97. (On an AMX CPU without the
# plan's VLLM_CPU_INT4_W4A8=0, vLLM rounds activations to int8 too: KL 0.032, which fails here; with it
# 0.0017, top-1 0.956 on a Xeon with AMX.)
MAX_KL = 0.02
MIN_TOP1 = 0.94


@pytest.mark.slow
def test_w4a16_served_by_vllm_matches_transformers_on_the_decompressed_model(demo, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import emq
    from emq import fidelity as F
    from emq.engine import load
    from emq.machine import snapshot
    from emq.engine_env import engine_env
    from emq.plan import EngineSettings
    from emq.schema import QuantMethod

    why_not = snapshot(tmp_path).vllm.unsupported.get(QuantMethod.w4a16)
    if why_not:
        pytest.skip(f"this machine's vLLM cannot serve W4A16: {why_not}")
    path = emq.quantize(str(demo.base), cache_dir=tmp_path, group_size=64, device="cpu")
    env = engine_env(QuantMethod.w4a16, snapshot(tmp_path), [])  # as a run's plan sets it (W4A16, not vLLM's W4A8)
    tokens = F.tokenize(F.load_corpus("default"), AutoTokenizer.from_pretrained(path))
    settings = EngineSettings(quantization="compressed-tensors", dtype="bfloat16", memory_utilization=0.3,
                              max_model_len=2048, enforce_eager=True, enable_lora=False, max_lora_rank=None,
                              enable_chunked_prefill=False, env=env)
    engine = load(str(path), settings, lora_path=None, seed=0, max_logprobs=20)
    try:
        assert engine.record.weights_gib is not None and engine.record.weights_gib < 0.15  # int4, measured
        served = F.score_engine(engine, tokens, 20, {"what": "vllm"})
    finally:
        engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows_ids, rows_lp, toks, tok_lp = [], [], [], []
    with torch.no_grad():
        for seq, start in zip(tokens.sequences, tokens.answer_start):
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, start - 1: len(seq) - 1].float(), -1)
            top = lp.topk(20, dim=-1)
            target = torch.tensor(seq[start:])
            rows_ids.append(top.indices.numpy())
            rows_lp.append(top.values.numpy())
            toks.append(target.numpy())
            tok_lp.append(lp.gather(1, target[:, None])[:, 0].numpy())
    ref = F.TopK(np.concatenate(rows_ids), np.concatenate(rows_lp).astype(np.float32), np.concatenate(toks),
                 np.concatenate(tok_lp).astype(np.float32), {"what": "transformers"})
    diff = F.compare(ref, served)
    assert diff["kl_mean"] < MAX_KL and diff["top1_agreement"] > MIN_TOP1, diff


class _FakeLLMEngine:
    """vLLM's LLMEngine as Engine.run uses it: records every call, finishes each request on the first step."""

    def __init__(self, pausable=True, fail_on_add=None):
        self.calls: list[tuple] = []
        self.unfinished: list[str] = []
        self.fail_on_add = fail_on_add
        if not pausable:  # an old vLLM: sleep(level) without a pause mode
            self.sleep = lambda level=1: self.calls.append(("sleep", level))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level, mode))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def add_request(self, rid, prompt, params, lora_request=None):
        if self.fail_on_add == len(self.unfinished):
            raise RuntimeError("engine died")
        self.calls.append(("add", rid))
        self.unfinished.append(rid)

    def abort_request(self, rids):
        self.calls.append(("abort", tuple(rids)))

    def has_unfinished_requests(self):
        return bool(self.unfinished)

    def step(self):
        self.calls.append(("step",))
        done, self.unfinished = self.unfinished, []
        return [type("Out", (), {"request_id": r, "finished": True})() for r in done]


def _engine(fake):
    from emq.engine import Engine, LoadRecord

    return Engine(type("LLM", (), {"llm_engine": fake})(), None, LoadRecord("m", None, {}, 0.0))


def _requests(n):
    from vllm import SamplingParams

    from emq.engine import Request

    return [Request(f"r{i}", [1, 2, i], SamplingParams(max_tokens=1)) for i in range(n)]


def test_run_adds_every_request_while_the_scheduler_waits_then_releases_it():
    fake = _FakeLLMEngine()
    done = []
    _engine(fake).run(_requests(3), lambda r, out, s: done.append(r.id))
    names = [c[0] for c in fake.calls]
    assert names == ["reset_prefix_cache", "sleep", "add", "add", "add", "wake_up", "step"]
    assert fake.calls[1] == ("sleep", 0, "keep") and fake.calls[5] == ("wake_up", ["scheduling"])
    assert done == ["r0", "r1", "r2"]


def test_run_releases_the_scheduler_and_aborts_when_adding_fails():
    fake = _FakeLLMEngine(fail_on_add=2)
    with pytest.raises(RuntimeError, match="engine died"):
        _engine(fake).run(_requests(3), lambda *a: None)
    assert ("wake_up", ["scheduling"]) in fake.calls and fake.calls[-1][0] == "abort"
    assert "step" not in [c[0] for c in fake.calls]


def test_run_on_a_vllm_without_a_scheduler_pause_says_batches_depend_on_timing(caplog):
    fake = _FakeLLMEngine(pausable=False)
    engine = _engine(fake)
    with caplog.at_level("WARNING"):
        engine.run(_requests(2), lambda *a: None)
    assert [c[0] for c in fake.calls] == ["reset_prefix_cache", "add", "add", "step"]
    assert "depend on timing" in caplog.text and not engine.can_hold()
    one = _FakeLLMEngine()
    _engine(one).run(_requests(1), lambda *a: None)  # one request has nothing to be batched with: no pause
    assert [c[0] for c in one.calls] == ["reset_prefix_cache", "add", "step"]


def test_batch_invariant_kernels_on_cuda_and_a_clear_refusal_on_the_cpu_build():
    from emq.errors import EmqError
    from tests.plans import cuda_vllm, fake_machine, plan_for

    gpu = plan_for(machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()), batch_invariant=True)
    assert gpu.engine.env.get("VLLM_BATCH_INVARIANT") == "1" and any("VLLM_BATCH_INVARIANT" in r for r in gpu.reasons)
    assert "VLLM_BATCH_INVARIANT" not in plan_for(machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm())).engine.env
    with pytest.raises(EmqError, match="(?s)memory.batch_invariant=true.*CPU build.*memory.batch_invariant=false"):
        plan_for(machine=fake_machine(), batch_invariant=True)


def test_the_processs_cuda_cache_is_released_before_the_engine_starts(monkeypatch):
    """CUDA cannot run here: torch.cuda is replaced by a stand-in holding 13 GiB of cache (what a 7B quantize left on
    an H100). Without CUDA in use (the CPU machine), nothing is touched."""
    import sys
    import types

    from emq.engine import release_cuda_cache

    state = {"reserved": 13 * 2**30, "emptied": 0}
    cuda = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                                 memory_reserved=lambda: state["reserved"],
                                 empty_cache=lambda: state.update(reserved=2**28, emptied=state["emptied"] + 1))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert release_cuda_cache() == 13 * 2**30 - 2**28 and state["emptied"] == 1
    cuda.is_initialized = lambda: False  # CUDA never used in this process: nothing to hand back, nothing started
    assert release_cuda_cache() == 0 and state["emptied"] == 1
    monkeypatch.delitem(sys.modules, "torch")
    assert release_cuda_cache() == 0
