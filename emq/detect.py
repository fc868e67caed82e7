"""detect: what is this model? Was the adapter trained on a 4-bit base, and what are its facts?

Reads only metadata: JSON/YAML configs, the model card's front matter and safetensors headers.
No weights are loaded.

Evidence for `trained_in_4bit`, strongest first:
  1. a training config tied to this adapter (explicit path, or a file beside the adapter);
  2. the adapter's metadata: the base it names in adapter_config.json being a pre-quantized
     bitsandbytes checkpoint; the model card's tags;
  3. the base model's own `quantization_config`;
  4. naming patterns (4bit, bnb, qlora, nf4) — never decisive against a stronger source.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emq import hub
from emq.errors import EmqError
from emq.safetensors_header import safetensors_header
from emq.schema import ModelConfig

log = logging.getLogger(__name__)

OVERRIDE = 100
TRAINING_CONFIG = 40
ADAPTER_BASE_QUANTIZED = 30
MODEL_CARD_TAG = 25
BASE_CONFIG = 20
WEAK_NEGATIVE = 10
NAMING = 5

_NAME_PATTERN = re.compile(r"(4[-_]?bit|bnb|qlora|nf4)", re.IGNORECASE)
_TRAINING_CONFIG_GLOBS = ("training_config.json", "train_config.json", "config_*.json", "*.yaml", "*.yml")
_IDENTITY_KEYS = ("finetuned_model_id", "hub_model_id", "output_dir", "output")
_BASE_KEYS = ("model", "base_model")
_BYTES_PER_DTYPE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Linear layers vLLM's LoRA path serves (packed or not), across the common decoder families.
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                     "gate_up_proj", "dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn",
                     "c_proj", "c_fc", "fc1", "fc2", "out_proj", "w1", "w2", "w3", "wqkv", "wo"}
VLLM_MAX_LORA_RANK = 512


@dataclass(frozen=True)
class Evidence:
    """One thing a source said about 4-bit training."""

    source: str  # file path (or hub id for names)
    key: str
    value: Any
    says: bool | None  # True: trained in 4-bit; False: not; None: not evidence for this adapter
    weight: int
    note: str = ""


@dataclass(frozen=True)
class AdapterFacts:
    path: str
    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: list[str]
    modules_to_save: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    bias: str
    base_model_name_or_path: str | None
    base_revision: str | None
    peft_type: str
    weight_file: str | None
    weight_bytes: int
    vllm_lora_ok: bool
    vllm_lora_blockers: list[str]


@dataclass(frozen=True)
class BaseFacts:
    ref: str  # what to hand to vLLM: the local directory, or the hub id
    path: str  # local directory with (at least) the metadata files
    architecture: str
    model_type: str
    dtype: str | None
    weights_local: bool  # the safetensors shards are on disk (not just hub metadata)
    param_count: int | None  # from safetensors headers, else from the index's total_size
    param_bytes: int | None
    bytes_per_dtype: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    largest_shard_bytes: int = 0
    largest_linear_bytes: int = 0  # the biggest 2-D weight a LoRA targets (headers, else config)
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    quantization_config: dict[str, Any] | None = None
    # the decoder's Linear weights (what w4a16 quantizes): their total parameters and distinct [out, in]
    # shapes, from the safetensors headers, else from config.json
    linear_params: int | None = None
    linear_shapes: list[list[int]] = field(default_factory=list)
    moe: bool = False  # mixture-of-experts layers (config: num_experts / num_local_experts)


@dataclass(frozen=True)
class DetectResult:
    """The detect stage's record."""

    model: str
    base: BaseFacts
    adapter: AdapterFacts | None
    trained_in_4bit: bool | None  # None: unknown
    confidence: float
    decided_by: str | None
    evidence: list[Evidence]
    conflicts: list[str] = field(default_factory=list)
    # the adapter's own training chats, where detect finds them (quant.calibration.corpus=training)
    training_data: str | None = None


# --- file readers: one clear error per bad file ----------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmqError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})",
                       "repair or replace the file") from None
    except UnicodeDecodeError:
        raise EmqError(f"{path} is not a text file", "repair or replace the file") from None
    if not isinstance(data, dict):
        raise EmqError(f"{path} must hold a JSON object, found {type(data).__name__}",
                       "repair or replace the file")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EmqError(f"{path} is not valid YAML ({str(e).splitlines()[0]})", "repair or replace the file") from None
    return data if isinstance(data, dict) else {}


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card; a card without one (or a broken one) says nothing."""
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# --- base ----------------------------------------------------------------------------------

@functools.cache
def _known_architectures() -> set[str]:
    """Causal-LM class names transformers knows. Read from modeling_auto.py's source: importing
    it costs ~2.5 s (it pulls in the generation stack), more than the whole stream merge of a
    small model; the import is the fallback if the source ever changes shape."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec and spec.origin:
        src = Path(spec.origin).parent / "models" / "auto" / "modeling_auto.py"
        text = src.read_text() if src.is_file() else ""
        m = re.search(r"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = OrderedDict\((.*?)\n\)\n", text, re.S)
        names = set(re.findall(r'\(\s*"[\w-]+",\s*"(\w+)"\s*\)', m.group(1))) if m else set()
        if len(names) > 20:
            return names
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _required_json(path: Path, missing: str, fix: str) -> dict[str, Any]:
    """The JSON file a model directory must have; missing → one error that says what the directory is not."""
    if not path.is_file():
        raise EmqError(f"{path} is missing: {missing}", fix)
    return read_json(path)


def _base_facts(base_dir: Path, ref: str) -> BaseFacts:
    cfg_path = base_dir / "config.json"
    cfg = _required_json(cfg_path, "model.base does not look like a Hugging Face model",
                         "point model.base at a directory with config.json and *.safetensors")
    archs = cfg.get("architectures") or []
    if not archs or "model_type" not in cfg:
        raise EmqError(f"{cfg_path} names no architecture (needs 'architectures' and 'model_type')",
                       "use the config.json saved with the model")
    if archs[0] not in _known_architectures():
        raise EmqError(f"unknown architecture {archs[0]!r} in {cfg_path}: not a causal LM transformers knows",
                       "emq prepares decoder-only causal LMs (Llama, Qwen2, Mistral, …); check the base path")
    index_path = base_dir / "model.safetensors.index.json"
    index = read_json(index_path) if index_path.is_file() else None
    if index is not None:
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise EmqError(f"{index_path} has no weight_map", "re-download or re-save the model")
    else:
        shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    present = [s for s in shards if (base_dir / s).is_file()]
    if present and len(present) < len(shards):
        missing = sorted(set(shards) - set(present))
        raise EmqError(f"{index_path} lists shards that are missing: {missing[:3]}{' …' if len(missing) > 3 else ''}",
                       "finish the download (or re-save the model) so every shard is present")
    count = nbytes = largest = linear = linear_params = 0
    shapes: set[tuple[int, int]] = set()
    per_dtype: dict[str, int] = {}
    for s in present:
        path = base_dir / s
        largest = max(largest, path.stat().st_size)
        for name, info in safetensors_header(path).items():
            numel = 1
            for d in info["shape"]:
                numel *= d
            b = numel * _BYTES_PER_DTYPE.get(info["dtype"], 2)
            if len(info["shape"]) == 2 and not any(k in name for k in ("embed", "lm_head", "wte", "wpe")):
                linear = max(linear, b)
                if name.endswith(".weight") and "norm" not in name:
                    linear_params += numel
                    shapes.add(tuple(info["shape"]))
            count += numel
            nbytes += b
            per_dtype[info["dtype"]] = per_dtype.get(info["dtype"], 0) + b
    if not shards and not (base_dir / "pytorch_model.bin").exists():
        log.info("detect: %s has no weight files here (hub metadata only)", base_dir)
    if present:
        param_count, param_bytes = count, nbytes
    elif index is not None and (index.get("metadata") or {}).get("total_size"):
        param_bytes = int(index["metadata"]["total_size"])
        param_count = param_bytes // 2  # bf16/fp16 checkpoints; recorded as an estimate
    else:
        param_count = param_bytes = None
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    if not shapes:
        shapes, linear_params = _linear_shapes_from_config(cfg, head_dim)
    return BaseFacts(
        ref=str(base_dir) if hub.looks_local(ref) else ref, path=str(base_dir), architecture=archs[0],
        model_type=cfg["model_type"], dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        weights_local=bool(present), param_count=param_count, param_bytes=param_bytes,
        bytes_per_dtype=per_dtype, shards=shards, largest_shard_bytes=largest,
        largest_linear_bytes=linear or 2 * (cfg.get("hidden_size") or 0) * max(
            cfg.get("intermediate_size") or 0, cfg.get("hidden_size") or 0),
        num_layers=cfg.get("num_hidden_layers"), num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        quantization_config=cfg.get("quantization_config"),
        linear_params=linear_params or None, linear_shapes=sorted([list(t) for t in shapes]),
        moe=bool(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")),
    )


def _linear_shapes_from_config(cfg: dict[str, Any], head_dim: int | None) -> tuple[set[tuple[int, int]], int]:
    """A Llama-style decoder's Linear shapes and their parameter total, when no weights are on disk."""
    hidden, inter, layers = cfg.get("hidden_size"), cfg.get("intermediate_size"), cfg.get("num_hidden_layers")
    heads = cfg.get("num_attention_heads")
    if not (hidden and inter and layers and heads and head_dim):
        return set(), 0
    q, kv = heads * head_dim, (cfg.get("num_key_value_heads") or heads) * head_dim
    per_layer = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]
    return set(per_layer), layers * sum(o * i for o, i in per_layer)


# --- adapter -------------------------------------------------------------------------------

def _adapter_weights(adapter_dir: Path) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    return None


def _adapter_facts(adapter_dir: Path, from_hub: bool) -> AdapterFacts:
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = _required_json(cfg_path, "model.adapter is not a PEFT adapter",
                         "point model.adapter at the directory PEFT's save_pretrained wrote, or set it to null")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise EmqError(f"{cfg_path} is a {peft_type} adapter; emq handles LoRA (incl. QLoRA, rsLoRA)",
                       "use a LoRA adapter")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise EmqError(f"{cfg_path} has r={rank!r}; the LoRA rank must be a positive integer",
                       "re-save the adapter with PEFT")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise EmqError(f"{cfg_path} has no target_modules", "re-save the adapter with PEFT")
    weights = _adapter_weights(adapter_dir)
    if weights is None and not from_hub:  # from the hub, detect fetches metadata only
        raise EmqError(f"{adapter_dir} has no adapter_model.safetensors (or .bin)",
                       "copy the adapter weights next to adapter_config.json")
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    modules_to_save = sorted(cfg.get("modules_to_save") or [])
    blockers = []
    if cfg.get("use_dora"):
        blockers.append("DoRA (vLLM's LoRA path serves plain LoRA)")
    if max([rank, *rank_pattern.values()]) > VLLM_MAX_LORA_RANK:
        blockers.append(f"rank above vLLM's maximum {VLLM_MAX_LORA_RANK}")
    if modules_to_save:
        blockers.append(f"modules_to_save {modules_to_save} (vLLM's LoRA path cannot serve fully trained modules)")
    odd = sorted(set(targets) - VLLM_LORA_MODULES)
    if odd:
        blockers.append(f"target modules vLLM's LoRA path may not serve: {odd}")
    if cfg.get("lora_bias"):
        blockers.append("lora_bias=true")
    return AdapterFacts(
        path=str(adapter_dir), rank=rank, alpha=float(cfg.get("lora_alpha", rank)),
        use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
        target_modules=sorted(targets), modules_to_save=modules_to_save, rank_pattern=rank_pattern,
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}), fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        bias=str(cfg.get("bias", "none")), base_model_name_or_path=cfg.get("base_model_name_or_path"),
        base_revision=cfg.get("revision"), peft_type=peft_type, weight_file=weights.name if weights else None,
        weight_bytes=weights.stat().st_size if weights else 0, vllm_lora_ok=not blockers, vllm_lora_blockers=blockers,
    )


def _check_adapter_fits_base(adapter: AdapterFacts, base: BaseFacts) -> None:
    """Every LoRA tensor must target a base weight that exists, with matching shapes."""
    if not base.weights_local or adapter.weight_file != "adapter_model.safetensors":
        return
    base_shapes: dict[str, list[int]] = {}
    for s in base.shards:
        base_shapes.update({k: v["shape"] for k, v in safetensors_header(Path(base.path) / s).items()})
    apath = Path(adapter.path) / adapter.weight_file
    cfg_path = Path(adapter.path) / "adapter_config.json"
    _check_targets_exist(adapter, base, base_shapes, cfg_path)
    ranks: dict[str, dict[str, int]] = {}
    for name, info in safetensors_header(apath).items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if not m:
            continue
        module, ab = m.group(1), m.group(2)
        if len(info["shape"]) == 2:
            ranks.setdefault(module, {})[ab] = info["shape"][0] if ab == "A" else info["shape"][1]
        target = f"{module}.weight"
        if target not in base_shapes:
            raise EmqError(f"{apath}: tensor {name} targets {target}, which the base {base.path} does not have "
                           f"({base.architecture})",
                           "this adapter was trained on a different base; set model.base to that base")
        out_f, in_f = base_shapes[target][:2]
        if adapter.fan_in_fan_out:
            out_f, in_f = in_f, out_f
        shape = info["shape"]
        want = in_f if ab == "A" else out_f
        got = shape[1] if ab == "A" else shape[0]
        if got != want:
            raise EmqError(f"{apath}: {name} has shape {shape} but {target} in the base is {base_shapes[target]}",
                           "this adapter was trained on a base of another size; set model.base to that base")
    _check_ranks(adapter, ranks, apath, cfg_path)


def _rank_for(module: str, adapter: AdapterFacts) -> int:
    """The rank adapter_config.json gives `module`: its rank_pattern entry (PEFT matches keys as a regex on the
    module name's end), else r."""
    for key, r in adapter.rank_pattern.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return int(r)
    return adapter.rank


def _check_ranks(adapter: AdapterFacts, ranks: dict[str, dict[str, int]], apath: Path, cfg_path: Path) -> None:
    """lora_A and lora_B of a module share one rank, and it is the rank adapter_config.json says (a mismatch would
    merge garbage, or fail deep in PEFT or vLLM)."""
    for module, r in sorted(ranks.items()):
        if "A" in r and "B" in r and r["A"] != r["B"]:
            raise EmqError(f"{apath}: {module}.lora_A has rank {r['A']} but {module}.lora_B has rank {r['B']}; the "
                           "two halves of one LoRA module must share a rank",
                           "the adapter file is corrupt or was assembled from two adapters: re-export it from training")
        got, want = r.get("A", r.get("B")), _rank_for(module, adapter)
        if got != want:
            raise EmqError(f"{cfg_path} says rank {want} for {module} (r / rank_pattern), but its tensors in {apath} "
                           f"have rank {got}",
                           f"fix r (or rank_pattern) in {cfg_path} to match the weights, or use the matching weights")


def _check_targets_exist(adapter: AdapterFacts, base: BaseFacts, base_shapes: dict[str, list[int]],
                         cfg_path: Path) -> None:
    """Every module adapter_config.json's target_modules names exists in the base (PEFT refuses a target that
    matches nothing; a silent mismatch means an adapter for another architecture)."""
    names = {k.removesuffix(".weight").rsplit(".", 1)[-1] for k in base_shapes if k.endswith(".weight")}
    missing = sorted(t for t in adapter.target_modules if t not in names and t != "all-linear"
                     and not re.search(r"[\\^$*+?()\[\]|]", t))  # a regex target is PEFT's to match
    if missing:
        raise EmqError(f"{cfg_path}: target_modules names {missing}, which the base {base.path} ({base.architecture}) "
                       f"has no module called",
                       f"this adapter was made for another architecture: set model.base to its base (this one has "
                       f"{', '.join(sorted(n for n in names if 'proj' in n or 'fc' in n)[:12])})")


def check_ignore(ignore: list[str], base: DetectResult) -> None:
    """quant.ignore entries must name Linear modules the base has (matched as name suffixes, as the quantizers
    match them); a typo would silently quantize what the user meant to keep."""
    if not ignore:
        return
    names: set[str] = set()
    for s in base.base.shards:
        names |= {k.removesuffix(".weight") for k in safetensors_header(Path(base.base.path) / s) if k.endswith(".weight")}
    missing = [i for i in ignore if i != "lm_head" and not any(n == i or n.endswith("." + i) for n in names)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names if "proj" in n or "fc" in n or "head" in n})
        raise EmqError(f"quant.ignore={list(ignore)}: {missing} match no module of the base {base.base.path}",
                       f"name modules it has (matched as name suffixes, e.g. {', '.join(kinds[:8])}; "
                       "or model.layers.0.mlp.down_proj for one layer), or drop them")


# --- evidence ------------------------------------------------------------------------------

def _norm(name: str) -> str:
    """Compare model names loosely: last path part, lower case, quantization suffixes dropped."""
    last = name.rstrip("/").split("/")[-1].lower()
    return re.sub(r"(-unsloth)?(-bnb)?-4bit$", "", last)


def _says_4bit(cfg: dict[str, Any]) -> tuple[str, Any, bool] | None:
    """(key, value, verdict) from a training config's 4-bit keys, if it has any."""
    if "load_in_4bit" in cfg:
        return "load_in_4bit", cfg["load_in_4bit"], bool(cfg["load_in_4bit"])
    if str(cfg.get("adapter", "")).lower() in ("qlora", "lora"):
        return "adapter", cfg["adapter"], str(cfg["adapter"]).lower() == "qlora"
    for k in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant"):
        if k in cfg:
            return k, cfg[k], True
    for k in ("quantization", "quantization_config"):
        v = cfg.get(k)
        if isinstance(v, dict):
            found = _says_4bit(v)
            if found:
                return f"{k}.{found[0]}", found[1], found[2]
        elif v is not None:
            return k, v, bool(re.search(r"4|nf4|bnb", str(v), re.IGNORECASE))
    if cfg.get("load_in_8bit"):
        return "load_in_8bit", cfg["load_in_8bit"], False
    return None


def _training_config_paths(model: ModelConfig, adapter_dir: Path) -> list[Path]:
    paths: list[Path] = []
    if model.training_config:
        p = Path(model.training_config).expanduser()
        if not p.is_file():
            raise EmqError(f"training config {p} (model.training_config) does not exist",
                           "fix the path or set model.training_config to null")
        paths.append(p)
    for pattern in _TRAINING_CONFIG_GLOBS:
        for p in sorted(adapter_dir.glob(pattern)):
            if p not in paths and p.name not in ("adapter_config.json", "config.json"):
                paths.append(p)
    return paths


TRAINING_DATA = "training_data.jsonl"  # beside the adapter: its training chats (the demo writes one)
_TRAINING_DATA_KEYS = ("dataset_file", "train_file", "training_file", "data_path", "dataset_path", "dataset")


def _training_data(model: ModelConfig, adapter_dir: Path) -> str | None:
    """The adapter's training chats: training_data.jsonl beside it, else a JSONL / JSON file its training config
    names (dataset_file, train_file, …; relative to the config), else None."""
    if (adapter_dir / TRAINING_DATA).is_file():
        return str(adapter_dir / TRAINING_DATA)
    for p in _training_config_paths(model, adapter_dir):
        try:
            cfg = _read_yaml(p) if p.suffix in (".yaml", ".yml") else read_json(p)
        except EmqError:
            continue  # its own evidence reports a bad file
        for k in _TRAINING_DATA_KEYS:
            v = cfg.get(k)
            if isinstance(v, str) and Path(v).suffix in (".jsonl", ".json"):
                found = p.parent / Path(v).expanduser()
                if found.is_file():
                    return str(found)
    return None


def _not_this_adapter(cfg: dict[str, Any], model: ModelConfig, adapter: AdapterFacts) -> str | None:
    """Why a training config is about another model, or None if it may be about this one."""
    mine = {_norm(model.adapter or ""), _norm(adapter.path)}
    for k in _IDENTITY_KEYS:
        v = cfg.get(k)
        if isinstance(v, str) and v and _norm(v) not in mine:
            return f"{k}={v!r} names another adapter, not {model.adapter!r}"
    bases = {_norm(model.base)} | ({_norm(adapter.base_model_name_or_path)} if adapter.base_model_name_or_path else set())
    for k in _BASE_KEYS:
        v = cfg.get(k)
        if isinstance(v, str) and v and _norm(v) not in bases:
            return f"{k}={v!r} names another base model than {model.base!r}"
    return None


def _training_config_evidence(model: ModelConfig, adapter_dir: Path, adapter: AdapterFacts) -> list[Evidence]:
    out = []
    for p in _training_config_paths(model, adapter_dir):
        cfg = _read_yaml(p) if p.suffix in (".yaml", ".yml") else read_json(p)
        said = _says_4bit(cfg)
        if said is None:
            continue
        other = _not_this_adapter(cfg, model, adapter)
        if other:
            out.append(Evidence(str(p), said[0], said[1], None, 0, f"not evidence: {other}"))
        else:
            out.append(Evidence(str(p), said[0], said[1], said[2], TRAINING_CONFIG, "training config"))
    return out


def is_bnb_4bit(qc: dict[str, Any] | None) -> bool:
    return bool(qc) and (bool(qc.get("load_in_4bit")) or
                         (qc.get("quant_method") == "bitsandbytes" and not qc.get("load_in_8bit")))


def _adapter_metadata_evidence(model: ModelConfig, adapter_dir: Path, adapter: AdapterFacts,
                               base: BaseFacts) -> list[Evidence]:
    out = []
    named = adapter.base_model_name_or_path
    src = str(adapter_dir / "adapter_config.json")
    if named and named not in (model.base, base.path, base.ref):
        try:
            named_dir = hub.resolve(named, revision=adapter.base_revision, what="adapter's base",
                                    key="adapter_config.json base_model_name_or_path")
            qc = read_json(named_dir / "config.json").get("quantization_config") \
                if (named_dir / "config.json").is_file() else None
        except EmqError as e:
            out.append(Evidence(src, "base_model_name_or_path", named, None, 0,
                                f"could not read that base's config: {e.message}"))
        else:
            if is_bnb_4bit(qc):
                out.append(Evidence(src, "base_model_name_or_path", named, True, ADAPTER_BASE_QUANTIZED,
                                    f"trained on {named}, a bitsandbytes 4-bit checkpoint"))
            elif qc is None:
                out.append(Evidence(src, "base_model_name_or_path", named, False, WEAK_NEGATIVE,
                                    f"trained on {named}, not a pre-quantized checkpoint"))
    readme = adapter_dir / "README.md"
    if readme.is_file():
        card = _front_matter(readme)
        tags = card.get("tags") or []
        tags = [tags] if isinstance(tags, str) else tags
        hits = [t for t in tags if isinstance(t, str) and _NAME_PATTERN.search(t)]
        if hits:
            out.append(Evidence(str(readme), "tags", hits, True, MODEL_CARD_TAG, "model card tags"))
        card_base = card.get("base_model")
        for b in [card_base] if isinstance(card_base, str) else (card_base or []):
            if isinstance(b, str) and _NAME_PATTERN.search(b):
                out.append(Evidence(str(readme), "base_model", b, True, NAMING, "model card base_model name"))
    for ref, src_name in ((model.adapter or "", "model.adapter"), (named or "", src)):
        m = _NAME_PATTERN.search(ref)
        if m:
            out.append(Evidence(src_name, "name", ref, True, NAMING, f"naming pattern {m.group(0)!r}"))
    return out


def _base_config_evidence(base: BaseFacts) -> Evidence:
    src = f"{base.path}/config.json"
    if is_bnb_4bit(base.quantization_config):
        return Evidence(src, "quantization_config", base.quantization_config, True, BASE_CONFIG,
                        "the base itself is a bitsandbytes 4-bit checkpoint")
    return Evidence(src, "quantization_config", base.quantization_config, False, WEAK_NEGATIVE,
                    "the base is not pre-quantized (weak: QLoRA usually quantizes in flight)")


def _decide(evidence: list[Evidence]) -> tuple[bool | None, float, str | None, list[str]]:
    votes = [e for e in evidence if e.says is not None]
    if not votes:
        return None, 0.0, None, []
    top = max(votes, key=lambda e: e.weight)
    total = sum(e.weight for e in votes)
    agree = sum(e.weight for e in votes if e.says == top.says)
    confidence = 1.0 if top.weight >= OVERRIDE else round(agree / total * min(1.0, top.weight / TRAINING_CONFIG), 2)
    conflicts = [f"{e.source}:{e.key} says {'4-bit' if e.says else 'not 4-bit'} (weight {e.weight}), "
                 f"outweighed by {top.source}:{top.key} (weight {top.weight})"
                 for e in votes if e.says != top.says]
    return top.says, confidence, f"{top.source}:{top.key}", conflicts


def _short_source(e: Evidence, model: ModelConfig, adapter_dir: Path | None, base_dir: Path) -> Evidence:
    """Name hub files as `hub:<repo>/<file>` rather than by their snapshot path."""
    for ref, d in ((model.adapter, adapter_dir), (model.base, base_dir)):
        if ref and d is not None and not hub.looks_local(ref) and e.source.startswith(str(d)):
            return Evidence(f"hub:{ref}{e.source[len(str(d)):]}", e.key, e.value, e.says, e.weight, e.note)
    return e


def detect(model: ModelConfig, *, fetch_weights: bool = False) -> DetectResult:
    """Identify the base and adapter and decide whether the adapter was trained in 4-bit.

    Args:
        model: the model group of the run config.
        fetch_weights: for hub ids, fetch the weights too (merging needs them).

    Returns:
        The detect record: facts, verdict, confidence and every piece of evidence.

    Raises:
        EmqError: a path is missing, a file is malformed, the adapter does not fit the base, or
            the hub is unreachable and the repo is not cached.
    """
    adapter_dir = adapter = None
    if model.adapter:
        adapter_dir = hub.resolve(model.adapter, revision=model.adapter_revision, what="adapter", key="model.adapter",
                                  full=fetch_weights)
        adapter = _adapter_facts(adapter_dir, from_hub=not hub.looks_local(model.adapter))
    base_dir = hub.resolve(model.base, revision=model.base_revision, what="base model", key="model.base",
                           full=fetch_weights)
    base = _base_facts(base_dir, model.base)

    evidence: list[Evidence] = []
    if model.trained_in_4bit is not None:
        evidence.append(Evidence("config", "model.trained_in_4bit", model.trained_in_4bit,
                                 model.trained_in_4bit, OVERRIDE, "user override"))
    if adapter is not None:
        _check_adapter_fits_base(adapter, base)
        evidence += _training_config_evidence(model, adapter_dir, adapter)
        evidence += _adapter_metadata_evidence(model, adapter_dir, adapter, base)
        evidence.append(_base_config_evidence(base))
        trained, confidence, decided_by, conflicts = _decide(evidence)
    else:
        trained, confidence, decided_by, conflicts = None, 0.0, None, []
    evidence = [_short_source(e, model, adapter_dir, base_dir) for e in evidence]
    if adapter is not None:
        trained, confidence, decided_by, conflicts = _decide(evidence)
    result = DetectResult(model=model.name, base=base, adapter=adapter, trained_in_4bit=trained,
                          confidence=confidence, decided_by=decided_by, evidence=evidence, conflicts=conflicts,
                          training_data=_training_data(model, adapter_dir) if adapter is not None else None)
    log.info("detect: %s trained_in_4bit=%s (confidence %.2f, by %s)", model.name, trained, confidence, decided_by)
    return result
