"""W4A16 pack-quantized checkpoints: compressed-tensors' own decompression gives back exactly
`dequantize(qw)`, the config validates against compressed-tensors' models (what vLLM and transformers
parse), the group size choice explains itself, and a tiny Llama saved this way loads in transformers
with the same logits as a reference holding the dequantized weights."""
from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)

from emq.checkpoint.layout import choose_group_size
from emq.checkpoint.w4a16 import (
    QuantSpec,
    decode,
    dequantize,
    expand_groups,
    pack,
    quantization_config,
    quantize_rtn,
    scale_dtype_for,
)
from emq.errors import EmqError


def scheme_of(spec: QuantSpec) -> QuantizationScheme:
    """The scheme compressed-tensors builds from our config.json (the path transformers takes)."""
    return QuantizationConfig.model_validate(quantization_config(spec, ["lm_head"])).config_groups["group_0"]


def weight(out: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, 5] *= 8  # an outlier column, so groups differ in range
    w[3, :] = 0.0  # an all-zero row: every group of it has absmax 0
    w[7, :] = w[7, :].abs()  # an all-positive row: asymmetric groups with min > 0
    return w


CASES = [(96, 576, 32), (96, 576, 64), (64, 256, 128), (32, 4096, 128), (160, 128, 32)]


@pytest.mark.parametrize("out_f,in_f,gs", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_compressed_tensors_decompress_gives_exactly_dequantize(out_f, in_f, gs, symmetric, scale_dtype):
    spec = QuantSpec(group_size=gs, symmetric=symmetric)
    qw = quantize_rtn(weight(out_f, in_f, seed=out_f + in_f + gs), spec, scale_dtype)
    tensors = pack(qw, scale_dtype)

    assert tensors["weight_packed"].dtype == torch.int32
    assert tuple(tensors["weight_packed"].shape) == (out_f, in_f // 8)
    assert tensors["weight_scale"].dtype == scale_dtype
    assert tuple(tensors["weight_scale"].shape) == (out_f, in_f // gs)
    assert tensors["weight_shape"].dtype == torch.int64 and tensors["weight_shape"].tolist() == [out_f, in_f]
    if symmetric:
        assert "weight_zero_point" not in tensors
    else:
        zp = tensors["weight_zero_point"]
        assert zp.dtype == torch.int32 and tuple(zp.shape) == (-(-out_f // 8), in_f // gs)  # packed along out

    got = PackedQuantizationCompressor.decompress(dict(tensors), scheme_of(spec))["weight"]
    assert got.dtype == scale_dtype
    assert torch.equal(got, dequantize(qw, scale_dtype))
    assert torch.equal(got.float(), dequantize(qw))  # float32 view holds the same values


@pytest.mark.parametrize("symmetric", [True, False])
def test_eight_bit_round_trips_too(symmetric):
    spec = QuantSpec(group_size=64, symmetric=symmetric, bits=8)
    qw = quantize_rtn(weight(64, 128, seed=1), spec)
    assert int(qw.codes.min()) >= -128 and int(qw.codes.max()) <= 127
    got = PackedQuantizationCompressor.decompress(pack(qw), scheme_of(spec))["weight"]
    assert torch.equal(got, dequantize(qw, torch.bfloat16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_our_codes_are_what_compressed_tensors_quantize_gives_for_the_same_scales(symmetric):
    """compress() quantizes the float weight itself with our scales/zero points: same packed bits."""
    spec = QuantSpec(group_size=32, symmetric=symmetric)
    w = weight(96, 576, seed=3)
    qw = quantize_rtn(w, spec)
    state = {"weight": w, "weight_scale": qw.scale.to(torch.bfloat16)}
    if not symmetric:
        state["weight_zero_point"] = qw.zero_point
    theirs = PackedQuantizationCompressor.compress(state, scheme_of(spec))
    ours = pack(qw)
    assert torch.equal(theirs["weight_packed"], ours["weight_packed"])
    if not symmetric:
        assert torch.equal(theirs["weight_zero_point"], ours["weight_zero_point"])


def test_rtn_conventions_and_error_bound():
    w = weight(64, 256, seed=4)
    sym = quantize_rtn(w, QuantSpec(group_size=64))
    absmax = w.abs().reshape(64, 4, 64).amax(-1)
    nonzero = absmax > 0
    # compressed-tensors' symmetric min-max rule, rounded to the stored dtype
    assert torch.equal(sym.scale[nonzero], (absmax / 7.5).to(torch.bfloat16).float()[nonzero])
    assert int(sym.codes.min()) >= -8 and int(sym.codes.max()) <= 7
    asym = quantize_rtn(w, QuantSpec(group_size=64, symmetric=False))
    assert int(asym.zero_point.min()) >= -8 and int(asym.zero_point.max()) <= 7
    for qw in (sym, asym):
        zp = None if qw.zero_point is None else expand_groups(qw.zero_point, 64)
        err = (w - decode(qw.codes, expand_groups(qw.scale, 64), zp)).abs()
        # half a step, plus the bf16 rounding of the scale (relative ≤ 2⁻⁸) at the group's extreme:
        # ≤ 7.5·2⁻⁸ ≈ 0.03 steps
        assert bool((err <= expand_groups(qw.scale, 64) * (0.5 + 7.5 * 2**-8)).all())
        assert torch.equal(dequantize(qw)[3], torch.zeros(256))  # zero stays exactly zero


def test_scale_dtype_follows_the_model():
    assert scale_dtype_for(torch.bfloat16) == torch.bfloat16
    assert scale_dtype_for("float16") == torch.float16
    assert scale_dtype_for("torch.float32") == torch.bfloat16
    qw = quantize_rtn(weight(32, 64, seed=5), QuantSpec(group_size=32), torch.float16)
    with pytest.raises(ValueError, match="quantized for torch.float16"):
        pack(qw, torch.bfloat16)
    # fp16 scales are floored at fp16's smallest normal, never 0
    tiny = quantize_rtn(torch.full((32, 64), 1e-9), QuantSpec(group_size=32), torch.float16)
    assert bool((tiny.scale >= torch.finfo(torch.float16).tiny).all())


def test_choose_group_size_auto():
    assert choose_group_size([4096, 11008], [11008, 4096], None)[0] == 128  # Llama-2-7B: 11008 = 86 × 128
    assert choose_group_size([960, 2560], [2560, 960], None)[0] == 64  # SmolLM2-360M: 960 = 7.5 × 128
    assert choose_group_size([1440, 4096], [4096, 1440], None)[0] == 32  # 1440 = 22.5 × 64
    size, reason = choose_group_size([576, 1536], [1536, 576], None)
    assert size == 64 and "576" in reason and "128" in reason
    assert choose_group_size([96], [96], None)[0] == 32
    assert choose_group_size([64, 128], [128, 64], None)[1] == (
        "group size 64 (auto): 128 does not divide in-feature 64; 64 divides every in-feature (64, 128)")


def test_choose_group_size_explicit():
    assert choose_group_size([4096, 11008], [11008, 4096], 64) == (
        64, "group size 64 (requested): divides every in-feature (4096, 11008)")
    assert choose_group_size([4096, 11008], [11008, 4096], 32)[0] == 32
    with pytest.raises(EmqError) as e:
        choose_group_size([576, 1536], [1536, 576], 128)
    assert "quant.group_size=128" in e.value.message and "576" in e.value.message
    assert "[64, 32]" in e.value.fix
    with pytest.raises(EmqError) as e:
        choose_group_size([4096], [4096], 256)
    assert "quant.group_size=256" in e.value.message and "[128, 64, 32]" in e.value.fix


def test_choose_group_size_rejects_features_the_kernels_cannot_take():
    with pytest.raises(EmqError) as e:
        choose_group_size([64, 33], [33, 64], None)  # (in 64, out 33) and (in 33, out 64)
    assert "33×64" in e.value.message and "CPUWNA16" in e.value.message and "multiples of 32" in e.value.message
    with pytest.raises(EmqError) as e:
        choose_group_size([64], [80], 32)  # out-features matter too
    assert "80×64" in e.value.message


@pytest.mark.parametrize("symmetric", [True, False])
def test_config_validates_against_compressed_tensors_models(symmetric):
    from transformers.utils.quantization_config import CompressedTensorsConfig

    spec = QuantSpec(group_size=64, symmetric=symmetric)
    cfg = quantization_config(spec, ["lm_head"])
    json.dumps(cfg)
    qc = QuantizationConfig.model_validate(cfg)
    assert qc.format == "pack-quantized" and qc.quantization_status == "compressed"
    assert qc.ignore == ["lm_head"]
    # vLLM validates each group's `weights` (extra fields forbidden) and the scheme
    args = QuantizationArgs.model_validate(cfg["config_groups"]["group_0"]["weights"])
    assert (args.num_bits, args.type, args.symmetric, args.strategy, args.group_size) == (
        4, "int", symmetric, "group", 64)
    assert QuantizationScheme.model_validate(cfg["config_groups"]["group_0"]).input_activations is None
    ht = CompressedTensorsConfig.from_dict({"quantization_config": cfg})
    assert ht.is_quantization_compressed


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=64,
                       tie_word_embeddings=False, attn_implementation="eager")


@pytest.mark.parametrize("symmetric", [True, False])
def test_tiny_llama_loads_in_transformers_with_the_dequantized_logits(tmp_path, symmetric):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    torch.manual_seed(0)
    config = tiny_llama_config()
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    size, _ = choose_group_size([m.in_features for m in linears.values()],
                                [m.out_features for m in linears.values()], None)
    assert size == 64
    spec = QuantSpec(group_size=size, symmetric=symmetric)

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    dense = dict(tensors)  # the reference checkpoint: same model, Linear weights = dequantize(qw)
    for name, lin in linears.items():
        qw = quantize_rtn(lin.weight.data, spec, torch.bfloat16)
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{k}": v for k, v in pack(qw, torch.bfloat16).items()})
        dense[f"{name}.weight"] = dequantize(qw, torch.bfloat16)

    ref_dir, q_dir = tmp_path / "reference", tmp_path / "w4a16"
    for d, sd, qcfg in ((ref_dir, dense, None), (q_dir, tensors, quantization_config(spec, ["lm_head"]))):
        config.save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["dtype"] = "bfloat16"
        if qcfg is not None:
            cfg["quantization_config"] = qcfg
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})

    # both through from_pretrained: the same attention kernel and rotary buffers, so any logit
    # difference comes from the weights alone
    load = {"dtype": torch.bfloat16, "attn_implementation": "eager", "output_loading_info": True}
    reference, _ = AutoModelForCausalLM.from_pretrained(ref_dir, **load)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference.eval()(ids).logits

    # compressed-tensors' checkpoint-level dequantizer agrees on every weight
    deq = CompressedTensorsDequantizer(q_dir, dtype=torch.bfloat16).process(dict(tensors))
    for name in linears:
        assert torch.equal(deq[f"{name}.weight"], dense[f"{name}.weight"]), name

    # default load (dequantize=False): weights stay packed until the first forward decompresses them;
    # `dequantize=True` (the old run_compressed=False) decompresses at load time
    for extra in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
        loaded, info = AutoModelForCausalLM.from_pretrained(q_dir, **load, **extra)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        first = loaded.get_submodule("model.layers.0.mlp.down_proj")
        # packed until the first forward unless dequantize=True
        assert hasattr(first, "weight_packed") == (not extra), dict(first.named_parameters()).keys()
        with torch.no_grad():
            got = loaded.eval()(ids).logits
        for name in linears:
            assert torch.equal(loaded.get_submodule(name).weight.data, dense[f"{name}.weight"]), name
        # same bf16 weights and ops: bit-identical logits
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_mse_scale_search_never_leaves_more_error_than_min_max(symmetric):
    from emq.checkpoint.w4a16 import ERROR_NORM

    w = weight(128, 512, seed=6)
    spec = QuantSpec(group_size=64, symmetric=symmetric)
    plain, searched = quantize_rtn(w, spec), quantize_rtn(w, QuantSpec(64, symmetric, scale_search="mse"))

    def group_error(qw):  # in float32, as the search measures it (dequantize rounds to the scale dtype)
        zp = None if qw.zero_point is None else expand_groups(qw.zero_point, 64)
        decoded = decode(qw.codes, expand_groups(qw.scale, 64), zp)
        return (decoded - w).abs().pow(ERROR_NORM).reshape(128, 8, 64).sum(-1)

    before, after = group_error(plain), group_error(searched)
    assert bool((after <= before * (1 + 1e-6)).all())  # the min-max range is one of the candidates: never worse
    assert float(after.sum()) < 0.95 * float(before.sum())  # and on Gaussian groups clipping pays
    assert int(searched.codes.min()) >= -8 and int(searched.codes.max()) <= 7
    assert torch.equal(quantize_rtn(w, QuantSpec(64, symmetric, scale_search="mse")).codes, searched.codes)


def test_an_unknown_scale_search_is_refused():
    with pytest.raises(ValueError, match="scale_search='absmax'"):
        QuantSpec(group_size=64, scale_search="absmax")


def test_the_scale_search_in_row_blocks_picks_what_one_block_would(monkeypatch):
    # a whole 7B Linear searched at once would take gigabytes: group_params searches blocks of rows
    from emq.checkpoint import w4a16
    from emq.checkpoint.w4a16 import group_params

    w = weight(300, 512, seed=7)
    whole = group_params(w, QuantSpec(64, False, scale_search="mse"))
    monkeypatch.setattr(w4a16, "SEARCH_BLOCK_ELEMENTS", len(w4a16.SHRINKS) * 512 * 7)  # 7 rows a block, last short
    blocks = group_params(w, QuantSpec(64, False, scale_search="mse"))
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])
