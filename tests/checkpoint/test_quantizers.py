"""emq.checkpoint.quantizers: algorithms found by name, one module each."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emq.checkpoint.quantizers import Quantizer, names, quantizer
from emq.checkpoint.w4a16 import QuantSpec, quantize_rtn, scale_dtype_for
from emq.errors import EmqError
from emq.schema import QuantAlgorithm

CONF = Path(__file__).resolve().parents[2] / "conf" / "quant"


def test_every_algorithm_is_one_module_one_enum_value_one_config():
    assert names() == sorted(a.value for a in QuantAlgorithm)
    for name in names():
        q = quantizer(name)
        assert isinstance(q, Quantizer) and q.name == name
        if q.calibrated:  # a config file each; rtn is quant=w4a16's default
            assert (CONF / f"w4a16_{name}.yaml").is_file()
            assert set(q.seconds_per_param_token) == {"cpu", "cuda"}
    assert not quantizer("rtn").calibrated and "quant.algorithm: rtn (default" in (CONF / "w4a16.yaml").read_text()


def test_an_unknown_algorithm_names_the_ones_there_are():
    with pytest.raises(EmqError, match="quant.algorithm=awq or gptq or rtn"):
        quantizer("hqq")


def test_awq_refuses_a_model_it_cannot_fold_into_from_its_config():
    with pytest.raises(EmqError, match="AWQ is not implemented"):
        quantizer("awq").check({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    quantizer("awq").check({"model_type": "llama"})
    quantizer("gptq").check({"model_type": "gpt2"})  # GPTQ needs no particular layout


def test_rtn_quantizes_each_linear_on_its_own():
    layer = torch.nn.Sequential()
    layer.add_module("a", torch.nn.Linear(64, 32, bias=False))
    job = type("Job", (), {"spec": QuantSpec(group_size=32, symmetric=False), "scale_dtype": scale_dtype_for(torch.bfloat16)})
    out, info = quantizer("rtn").quantize_layer(layer, ["a"], None, job)
    ref = quantize_rtn(layer.a.weight.detach(), job.spec, job.scale_dtype)
    assert info == {} and torch.equal(out["a"].codes, ref.codes) and torch.equal(out["a"].scale, ref.scale)


def test_the_planner_reads_quantizers_without_torch():
    import subprocess
    import sys

    code = "import sys, emq.plan; from emq.checkpoint.quantizers import quantizer; quantizer('awq'); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
