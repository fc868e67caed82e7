"""detect: what is this model? Was the adapter trained on a 4-bit base, and what are its facts?

Reads only metadata: JSON/YAML configs and safetensors headers. No weights are loaded.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emq import hub
from emq.errors import EmqError
from emq.schema import ModelConfig

log = logging.getLogger(__name__)

# Evidence strength, strongest first (DESIGN.md "detect").
OVERRIDE, TRAINING_CONFIG, ADAPTER_METADATA, BASE_CONFIG, NAMING = 100, 40, 30, 20, 5
_NAME_PATTERN = re.compile(r"(4[-_]?bit|bnb|qlora|nf4)", re.IGNORECASE)
_TRAINING_CONFIG_NAMES = ("training_config.json", "train_config.json")
_BYTES_PER_DTYPE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Evidence:
    """One thing a source said about 4-bit training."""

    source: str  # file path or hub file
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
    base_model_name_or_path: str | None
    peft_type: str
    weight_bytes: int


@dataclass(frozen=True)
class BaseFacts:
    ref: str  # what to hand to vLLM: the local directory, or the hub id
    path: str  # local directory with (at least) the metadata files
    architecture: str | None
    model_type: str | None
    dtype: str | None
    param_count: int | None  # from safetensors headers; None when the weights are not local
    param_bytes: int | None
    bytes_per_dtype: dict[str, int] = field(default_factory=dict)
    quantization_config: dict[str, Any] | None = None


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmqError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})",
                       "repair or replace the file") from None
    if not isinstance(data, dict):
        raise EmqError(f"{path} must hold a JSON object, found {type(data).__name__}",
                       "repair or replace the file")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EmqError(f"{path} is not valid YAML ({e})", "repair or replace the file") from None
    return data if isinstance(data, dict) else {}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), weights untouched."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise EmqError(f"{path} is empty or truncated (no safetensors header)",
                               "re-download or re-save the weights")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise EmqError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)",
                               "re-download or re-save the weights")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EmqError(f"{path} has a corrupt safetensors header", "re-download or re-save the weights") from None
    header.pop("__metadata__", None)
    return header


def _base_facts(base_dir: Path, key: str, ref: str) -> BaseFacts:
    cfg_path = base_dir / "config.json"
    if not cfg_path.is_file():
        raise EmqError(f"{cfg_path} is missing: {key} does not look like a Hugging Face model",
                       f"point {key} at a directory with config.json and *.safetensors")
    cfg = _read_json(cfg_path)
    archs = cfg.get("architectures") or [None]
    count = nbytes = 0
    per_dtype: dict[str, int] = {}
    files = sorted(base_dir.glob("*.safetensors"))
    for f in files:
        for name, info in safetensors_header(f).items():
            numel = 1
            for d in info["shape"]:
                numel *= d
            b = numel * _BYTES_PER_DTYPE.get(info["dtype"], 2)
            count += numel
            nbytes += b
            per_dtype[info["dtype"]] = per_dtype.get(info["dtype"], 0) + b
    return BaseFacts(
        ref=str(base_dir) if hub.looks_local(ref) else ref, path=str(base_dir), architecture=archs[0], model_type=cfg.get("model_type"),
        dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        param_count=count if files else None, param_bytes=nbytes if files else None,
        bytes_per_dtype=per_dtype, quantization_config=cfg.get("quantization_config"),
    )


def _adapter_facts(adapter_dir: Path, key: str) -> AdapterFacts:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise EmqError(f"{cfg_path} is missing: {key} is not a PEFT adapter",
                       "point model.adapter at the directory PEFT's save_pretrained wrote, or set it to null")
    cfg = _read_json(cfg_path)
    if "r" not in cfg:
        raise EmqError(f"{cfg_path} has no 'r' (rank): not a LoRA adapter config", "re-save the adapter with PEFT")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    weights = [p for p in (adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin") if p.is_file()]
    return AdapterFacts(
        path=str(adapter_dir), rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
        use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
        target_modules=sorted(targets), modules_to_save=sorted(cfg.get("modules_to_save") or []),
        rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        base_model_name_or_path=cfg.get("base_model_name_or_path"), peft_type=str(cfg.get("peft_type", "LORA")),
        weight_bytes=sum(p.stat().st_size for p in weights),
    )


def _says_4bit(cfg: dict[str, Any]) -> tuple[str, Any, bool] | None:
    """(key, value, verdict) from a training config's 4-bit keys, if any."""
    for k in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "adapter", "quantization"):
        if k not in cfg:
            continue
        v = cfg[k]
        if k == "load_in_4bit":
            return k, v, bool(v)
        if k == "adapter":
            if str(v).lower() in ("qlora", "lora"):
                return k, v, str(v).lower() == "qlora"
            continue
        if k == "quantization":
            return k, v, bool(re.search(r"4|nf4|bnb", str(v), re.IGNORECASE))
        return k, v, True
    if cfg.get("load_in_8bit"):
        return "load_in_8bit", cfg["load_in_8bit"], False
    return None


def _training_config_evidence(model: ModelConfig, adapter_dir: Path | None) -> list[Evidence]:
    paths: list[Path] = []
    if model.training_config:
        p = Path(model.training_config).expanduser()
        if not p.is_file():
            raise EmqError(f"training config {p} (model.training_config) does not exist",
                           "fix the path or set model.training_config to null")
        paths.append(p)
    if adapter_dir is not None:
        for name in _TRAINING_CONFIG_NAMES:
            if (adapter_dir / name).is_file():
                paths.append(adapter_dir / name)
    out = []
    for p in paths:
        cfg = _read_yaml(p) if p.suffix in (".yaml", ".yml") else _read_json(p)
        said = _says_4bit(cfg)
        if said is not None:
            out.append(Evidence(str(p), said[0], said[1], said[2], TRAINING_CONFIG))
    return out


def _adapter_base_evidence(facts: AdapterFacts, base: BaseFacts) -> list[Evidence]:
    qc = base.quantization_config
    src = f"{base.path}/config.json"
    if qc and (qc.get("load_in_4bit") or qc.get("quant_method") == "bitsandbytes"):
        return [Evidence(src, "quantization_config", qc, True, BASE_CONFIG,
                         "the base itself is a bitsandbytes 4-bit checkpoint")]
    return [Evidence(src, "quantization_config", None, False, BASE_CONFIG // 2,
                     "the base is not a pre-quantized checkpoint (weak: QLoRA usually quantizes in flight)")]


def _naming_evidence(refs: list[str]) -> list[Evidence]:
    out = []
    for ref in refs:
        m = _NAME_PATTERN.search(ref)
        if m:
            out.append(Evidence(ref, "name", m.group(0), True, NAMING, "naming pattern"))
    return out


def _decide(evidence: list[Evidence]) -> tuple[bool | None, float, str | None]:
    votes = [e for e in evidence if e.says is not None]
    if not votes:
        return None, 0.0, None
    top = max(votes, key=lambda e: e.weight)
    total = sum(e.weight for e in votes)
    agree = sum(e.weight for e in votes if e.says == top.says)
    return top.says, round(agree / total * min(1.0, top.weight / TRAINING_CONFIG), 2), f"{top.source}:{top.key}"


def detect(model: ModelConfig) -> DetectResult:
    """Identify the base and adapter and decide whether the adapter was trained in 4-bit.

    Args:
        model: the model group of the run config.

    Returns:
        The detect record.

    Raises:
        EmqError: a path is missing, a file is malformed, or the hub is unreachable.
    """
    adapter_dir = adapter = None
    if model.adapter:
        adapter_dir = hub.resolve(model.adapter, revision=model.adapter_revision, what="adapter", key="model.adapter")
        adapter = _adapter_facts(adapter_dir, "model.adapter")
    base_dir = hub.resolve(model.base, revision=model.base_revision, what="base model", key="model.base")
    base = _base_facts(base_dir, "model.base", model.base)

    evidence: list[Evidence] = []
    if model.trained_in_4bit is not None:
        evidence.append(Evidence("config", "model.trained_in_4bit", model.trained_in_4bit,
                                 model.trained_in_4bit, OVERRIDE, "user override"))
    if adapter is not None:
        evidence += _training_config_evidence(model, adapter_dir)
        evidence += _adapter_base_evidence(adapter, base)
        evidence += _naming_evidence([model.adapter or ""])
        trained, confidence, decided_by = _decide(evidence)
    else:
        trained, confidence, decided_by = None, 0.0, None
    result = DetectResult(model=model.name, base=base, adapter=adapter, trained_in_4bit=trained,
                          confidence=confidence, decided_by=decided_by, evidence=evidence)
    log.info("detect: %s trained_in_4bit=%s (confidence %.2f, by %s)", model.name, trained, confidence, decided_by)
    return result
