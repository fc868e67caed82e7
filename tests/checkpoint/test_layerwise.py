"""Layer-by-layer GPTQ / AWQ (emq.checkpoint.layerwise) on tiny random Llamas saved as bf16 safetensors:
each layer's output error on its calibration inputs is below round-to-nearest's, the checkpoint loads in
transformers and its held-out logits are closer to the original's than RTN's, compressed-tensors decodes
what was packed, AWQ's folding keeps the float function, bad inputs fail with one EmqError, and the
output is byte-identical run to run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from safetensors.torch import save_file

from emq.checkpoint.awq import awq_groups, fold_awq_scales
from emq.checkpoint.layerwise import quantize_layerwise
from emq.checkpoint.w4a16 import QuantSpec, QWeight, dequantize, quantization_config, quantize_rtn
from emq.errors import EmqError

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
OUTLIERS = [3, 17, 40, 41]  # hidden channels the norms amplify: activations with salient channels, as real LLMs have


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny ops on two busy cores: a second intra-op thread makes each op wait milliseconds for it
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama_config(kv_heads: int, tie: bool, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=kv_heads, head_dim=16, vocab_size=256, max_position_embeddings=64,
                       tie_word_embeddings=tie)


def random_llama(config, seed: int = 0):
    """A random float32 Llama whose norms amplify a few channels."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 0.2 * torch.randn(64))
                norm.weight[OUTLIERS] *= 8
            layer.mlp.up_proj.weight[:8] *= 6  # and a few loud down_proj inputs
    return model


def save_checkpoint(model, d: Path) -> Path:
    """Save as a bf16 checkpoint (config says bfloat16), as a Hub model would be."""
    d.mkdir(parents=True)
    model.config.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


def token_rows(n: int, seq: int, seed: int) -> list[list[int]]:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed)).tolist()


CALIBRATION = token_rows(16, 32, seed=1)
HELD_OUT = torch.tensor(token_rows(6, 32, seed=2))

# (name, kv heads, tied embeddings, layers, algorithm, symmetric)
CASES = {
    "gptq-gqa": (2, False, 3, "gptq", False),
    "awq-gqa": (2, False, 3, "awq", False),
    "gptq-mha": (4, True, 2, "gptq", True),
    "awq-mha": (4, True, 2, "awq", True),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    out = {}
    for kv, tie, layers in {(c[0], c[1], c[2]) for c in CASES.values()}:
        model = random_llama(llama_config(kv, tie, layers))
        out[(kv, tie, layers)] = save_checkpoint(model, root / f"kv{kv}-tie{tie}-l{layers}")
    return out


def run(src: Path, out: Path, algorithm: str, symmetric: bool, **kw) -> dict:
    out.mkdir(parents=True)
    kw.setdefault("ignore", ())
    kw.setdefault("tokens", CALIBRATION)
    return quantize_layerwise(src, out, algorithm=algorithm, spec=QuantSpec(group_size=32, symmetric=symmetric),
                              device="cpu", batch_size=5, **kw)


@pytest.fixture(scope="module")
def results(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    done = {}
    for name, (kv, tie, layers, algorithm, symmetric) in CASES.items():
        src = sources[(kv, tie, layers)]
        done[name] = (src, root / name, run(src, root / name, algorithm, symmetric))
    return done


def load(d: Path, **extra):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="eager",
                                                       output_loading_info=True, **extra)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(HELD_OUT).logits.float()


def rtn_model(src: Path, symmetric: bool):
    """The source model with every decoder Linear round-to-nearest quantized (bf16 weights, as served)."""
    model = load(src)
    spec = QuantSpec(group_size=32, symmetric=symmetric)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in LINEARS:
                w = layer.get_submodule(name).weight
                w.copy_(dequantize(quantize_rtn(w.float(), spec, torch.bfloat16), torch.bfloat16))
    return model


@pytest.mark.parametrize("case", CASES)
def test_each_layer_beats_rtn_on_its_calibration_inputs(results, case):
    _, _, manifest = results[case]
    json.dumps(manifest)  # the cache writes it as its manifest
    assert manifest["algorithm"] == CASES[case][3] and manifest["device"] == "cpu"
    assert len(manifest["layers"]) == CASES[case][2]
    for layer in manifest["layers"]:
        # both errors: the layer's outputs against the full-precision layer's, on the same inputs
        # (the outputs of the already-quantized layers before it)
        assert 0 < layer["output_mse"] < layer["rtn_output_mse"], layer
        assert layer["ratio_vs_rtn"] < 0.95, layer
        if CASES[case][3] == "gptq":
            assert set(layer["modules"]) == set(LINEARS)
            assert all(m["fallback"] is None and m["loss"] > 0 for m in layer["modules"].values())
            # and on each Linear's own objective, ‖X(W - Ŵ)ᵀ‖²/n
            assert all(m["objective"] < m["objective_rtn"] for m in layer["modules"].values()), layer
        else:
            assert all(0 <= g["alpha"] < 1 and g["ratio"] <= 1 for g in layer["groups"].values())


@pytest.mark.parametrize("case", CASES)
def test_loads_in_transformers_with_logits_closer_than_rtn(results, case):
    src, out, _ = results[case]
    want = logits(load(src))
    got = logits(load(out))
    rtn = logits(rtn_model(src, symmetric=CASES[case][4]))
    err, err_rtn = float(((got - want) ** 2).mean()), float(((rtn - want) ** 2).mean())
    assert err < 0.9 * err_rtn, (err, err_rtn)


@pytest.mark.parametrize("case", CASES)
def test_layout_index_and_config(results, case):
    src, out, manifest = results[case]
    kv, tie, layers, algorithm, symmetric = CASES[case]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{k:05d}-of-{layers + 1:05d}.safetensors" for k in range(1, layers + 2)]
    assert set(manifest["files_sha256"]) == set(shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    held = {}
    for s in shards:
        with safe_open(out / s, "pt") as f:
            held.update(dict.fromkeys(f.keys(), s))
    assert index == held
    # the rest first, then one shard per layer holding exactly that layer
    assert {n for n, s in held.items() if s == shards[0]} == {"model.embed_tokens.weight", "model.norm.weight"} | (
        set() if tie else {"lm_head.weight"})
    for i in range(layers):
        names = {n for n, s in held.items() if s == shards[i + 1]}
        assert all(n.startswith(f"model.layers.{i}.") for n in names)
        for lin in LINEARS:
            packed = {"weight_packed", "weight_scale", "weight_shape"} | (set() if symmetric else {"weight_zero_point"})
            assert {n.rsplit(".", 1)[1] for n in names if f".{lin}." in n} == packed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == quantization_config(QuantSpec(32, symmetric), ["lm_head"])
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] == tie
    assert not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("case", ["gptq-gqa", "awq-mha"])
def test_compressed_tensors_decodes_the_packed_codes(results, case):
    src, out, _ = results[case]
    symmetric = CASES[case][4]
    module = "model.layers.1.mlp.down_proj"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(out / index[f"{module}.weight_packed"], "pt") as f:
        tensors = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(module + ".")}
    out_f, in_f = tensors["weight_shape"].tolist()
    spec = QuantSpec(group_size=32, symmetric=symmetric)
    scheme = QuantizationConfig.model_validate(quantization_config(spec, ["lm_head"])).config_groups["group_0"]
    got = PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
    # our own reading of the packed codes: unsigned nibbles - 8, zero points packed along the out dim
    codes = unpack_from_int32(tensors["weight_packed"], 4, torch.Size([out_f, in_f]))
    zero = None if symmetric else unpack_from_int32(tensors["weight_zero_point"], 4,
                                                    torch.Size([out_f, in_f // 32]), packed_dim=0)
    qw = QWeight(codes=codes, scale=tensors["weight_scale"].float(), zero_point=zero, spec=spec,
                 scale_dtype=torch.bfloat16)
    assert torch.equal(got, dequantize(qw, torch.bfloat16))
    # and transformers serves exactly those weights
    loaded = load(out)
    with torch.no_grad():
        loaded(HELD_OUT[:1])  # decompresses on the first forward
    assert torch.equal(loaded.get_submodule(module).weight.data, got)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_awq_folding_keeps_the_float_function(kv_heads):
    """Any positive scales, folded: the float32 model computes the same logits."""
    model = random_llama(llama_config(kv_heads, tie=False, layers=2))
    want = logits(model)
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        groups = awq_groups(layer, "llama")
        # v → o only without grouped-query attention
        assert ("self_attn.v_proj" in {x.prev for x in groups}) == (kv_heads == 4)
        assert len(groups) == (4 if kv_heads == 4 else 3)
        for group in groups:
            width = layer.get_submodule(group.linears[0]).in_features
            fold_awq_scales(layer, group, torch.exp(torch.randn(width, generator=g)))
    assert model.model.layers[0].input_layernorm.weight.ne(random_llama(llama_config(kv_heads, False, 2))
                                                           .model.layers[0].input_layernorm.weight).any()
    got = logits(model)
    assert (got - want).abs().max() <= 1e-4


def test_awq_writes_the_folded_norms(results):
    src, out, manifest = results["awq-mha"]
    assert all("self_attn.v_proj" in layer["groups"] for layer in manifest["layers"])  # v → o folds without GQA
    assert all("self_attn.v_proj" not in layer["groups"] for layer in results["awq-gqa"][2]["layers"])
    name = "model.layers.0.input_layernorm.weight"
    with safe_open(src / "model.safetensors", "pt") as f:
        before = f.get_tensor(name)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(out / index[name], "pt") as f:
        after = f.get_tensor(name)
    assert after.dtype == torch.bfloat16 and not torch.equal(after, before)


def test_ignored_modules_stay_16_bit(sources, tmp_path):
    src = sources[(2, False, 3)]
    module = "model.layers.1.mlp.down_proj"  # a full name: compressed-tensors' ignore matches names exactly
    run(src, tmp_path / "q", "gptq", False, ignore=(module,))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["ignore"] == sorted(["lm_head", module])
    model = load(tmp_path / "q")
    with safe_open(src / "model.safetensors", "pt") as f:
        assert torch.equal(model.get_submodule(module).weight.data, f.get_tensor(f"{module}.weight"))


def test_same_inputs_give_byte_identical_shards(results, tmp_path):
    for case in ("gptq-gqa", "awq-gqa"):
        src, out, manifest = results[case]
        again = run(src, tmp_path / case, CASES[case][3], CASES[case][4])
        assert again["files_sha256"] == manifest["files_sha256"]
        for p in out.iterdir():
            assert p.read_bytes() == (tmp_path / case / p.name).read_bytes(), p.name


def gpt2_checkpoint(d: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    d.mkdir()
    model.config.save_pretrained(d)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_bad_inputs_fail_with_one_error_each(results, tmp_path):
    src, quantized, _ = results["gptq-gqa"]
    with pytest.raises(EmqError) as e:
        run(quantized, tmp_path / "a", "gptq", False)
    assert "already quantized" in e.value.message
    with pytest.raises(EmqError) as e:
        (tmp_path / "b").mkdir()
        quantize_layerwise(src, tmp_path / "b", algorithm="gptq", spec=QuantSpec(32), ignore=(), tokens=[],
                           device="cpu")
    assert "no calibration tokens" in e.value.message
    with pytest.raises(EmqError) as e:
        run(gpt2_checkpoint(tmp_path / "gpt2"), tmp_path / "c", "awq", True)
    assert "gpt2" in e.value.message and "quant.algorithm=gptq" in e.value.fix
    with pytest.raises(EmqError) as e:
        run(src, tmp_path / "d", "smoothquant", True)
    assert "smoothquant" in e.value.message
    assert not any(list((tmp_path / d).iterdir()) for d in "acd")  # refused before writing anything


def test_gptq_on_the_demo_model(demo, tmp_path):
    """SmolLM2-135M (30 layers, hidden 576), 4 × 64 calibration tokens: runs end to end and loads.
    43-55 s on the 2-core VM (mostly GPTQ's column loop), under the minute that would make it slow."""
    out = tmp_path / "q"
    manifest = run(Path(demo.base), out, "gptq", False, compare_rtn=False, tokens=token_rows(4, 64, seed=4))
    assert len(manifest["layers"]) == 30
    model = load(out)
    with torch.no_grad():
        assert torch.isfinite(model(HELD_OUT[:1]).logits).all()


def test_first_layer_errors_match_the_models_own_forward(sources, results):
    """Layer 0 sees the embeddings: its RTN output error, recomputed through transformers' whole forward
    (eager attention with its own causal mask and rotary embedding), is what the summary says."""
    from transformers import AutoModelForCausalLM

    src, _, manifest = results["gptq-gqa"]
    tokens = torch.tensor(CALIBRATION)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        want = model(tokens, output_hidden_states=True).hidden_states[1]
        layer = model.model.layers[0]
        for name in LINEARS:
            w = layer.get_submodule(name).weight
            w.copy_(dequantize(quantize_rtn(w, QuantSpec(group_size=32, symmetric=False), torch.bfloat16)))
        got = model(tokens, output_hidden_states=True).hidden_states[1]
    mse = float(((got - want).double() ** 2).mean())
    assert manifest["layers"][0]["rtn_output_mse"] == pytest.approx(mse, rel=1e-3)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_a_compensation_brings_the_served_layer_closer_and_is_written_beside_the_checkpoint(sources, tmp_path,
                                                                                            algorithm):
    """quant.compensation.rank: each Linear's rank-r compensation, fitted on its inputs, lowers every layer's output
    error against the same quantizer without it; the factors sit beside the checkpoint under a name vLLM does not
    load, and the checkpoint itself still loads with nothing missing or unexpected."""
    from safetensors.torch import load_file

    from emq.checkpoint.layerwise import COMPENSATION_FILE

    src = sources[(2, False, 3)]
    plain = run(src, tmp_path / "plain", algorithm, False)
    comp = run(src, tmp_path / "comp", algorithm, False, compensation_rank=8)
    assert comp["compensation_rank"] == 8 and "compensation_rank" not in plain
    for p, c in zip(plain["layers"], comp["layers"]):
        assert c["output_mse"] < p["output_mse"]
        assert all(m["compensated"] < m["error"] for m in c["compensation"].values())
    factors = load_file(str(tmp_path / "comp" / COMPENSATION_FILE))
    assert len(factors) == 2 * 3 * len(LINEARS) and factors["model.layers.0.self_attn.q_proj.a"].shape[0] == 8
    assert COMPENSATION_FILE in comp["files_sha256"] and not COMPENSATION_FILE.endswith(".safetensors")
    load(tmp_path / "comp")


def test_more_rounds_of_quantizing_and_refitting_never_leave_a_linear_worse(sources, tmp_path):
    """quant.compensation.rounds: the layer is quantized again from W − B·A and refitted; each Linear keeps its best
    round, so its compensated error is at most the first round's."""
    src = sources[(2, False, 3)]
    one = run(src, tmp_path / "one", "rtn", False, compensation_rank=4)
    three = run(src, tmp_path / "three", "rtn", False, compensation_rank=4, compensation_rounds=3)
    assert three["compensation_rounds"] == 3 and "compensation_rounds" not in one
    first = one["layers"][0]["compensation"]
    kept = three["layers"][0]["compensation"]
    assert all(kept[n]["compensated"] <= first[n]["compensated"] * (1 + 1e-6) for n in first)
    assert any(m["round"] > 0 for layer in three["layers"] for m in layer["compensation"].values())
