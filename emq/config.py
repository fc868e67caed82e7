"""The config layer: registers the schemas with Hydra and turns a composed config into a RunConfig.

Only this module and the entry point import Hydra; stages take the plain dataclasses of
`emq.schema`.
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from emq.errors import EmqError
from emq.judge.backends import backend
from emq.schema import (
    EvalConfig,
    JudgeConfig,
    MemoryConfig,
    ModelConfig,
    PathsConfig,
    QuantConfig,
    ReportConfig,
    RunConfig,
    check_values,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
GROUP_SCHEMAS = {
    "model": ModelConfig,
    "memory": MemoryConfig,
    "quant": QuantConfig,
    "eval": EvalConfig,
    "judge": JudgeConfig,
}


def register_configs() -> None:
    """Register `base_config` and `base_<group>` for every group (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="paths", name="base_paths", node=PathsConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    register_experiments(cs)


def register_experiments(cs: ConfigStore) -> None:
    """experiments/*.yaml (top level, in git) become the `experiment` group: `+experiment=NAME`.

    They are read from experiments/ itself at start-up (no copy under conf/); each is a global
    package (`# @package _global_`): overrides of any group plus its sweep in hydra.sweeper.params.
    """
    import yaml

    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        try:
            node = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise EmqError(f"{path} is not valid YAML: {e}", "fix the experiment file") from None
        cs.store(group="experiment", name=path.stem, node=node, package="_global_", provider="emq-experiments")


def _reject_unknown_keys(cfg: DictConfig) -> None:
    """`+group.key=...` bypasses struct mode and OmegaConf.to_object drops the key silently:
    refuse it, since a knob that is not used is a lie in the run's record."""
    schemas = {None: RunConfig, "paths": PathsConfig, "report": ReportConfig, **GROUP_SCHEMAS}
    for group, schema in schemas.items():
        node = cfg if group is None else cfg.get(group)
        if node is None:
            continue
        known = {f.name for f in fields(schema)} | ({"hydra"} if group is None else set())
        extra = sorted(set(node.keys()) - known)
        if extra:
            where = ", ".join(f"{group + '.' if group else ''}{k}" for k in extra)
            raise EmqError(f"unknown config key(s): {where}",
                           f"remove them; the known keys of {group or 'the run'} are {sorted(known)}")


def to_run_config(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve interpolations and convert to the typed run object (enums, dataclasses); judge.panel's members
    composed into `judges` (`overrides`: the command line's, whose judge.* keys every member takes)."""
    _reject_unknown_keys(cfg)
    if cfg.get("judges"):
        raise EmqError("judges is set directly", "name the judges in judge.panel=[OPTION,...] (conf/judge/ options); "
                       "emq composes `judges` from it")
    members = panel_members(cfg, overrides)
    run_cfg = OmegaConf.to_object(cfg)
    if not isinstance(run_cfg, RunConfig):  # pragma: no cover - composition guarantees it
        raise TypeError(f"composed config is {type(run_cfg).__name__}, expected RunConfig")
    if members:
        run_cfg.judges = members
        run_cfg.judge = members[0]
    run_cfg.paths.data_dir = str(Path(run_cfg.paths.data_dir).expanduser())
    run_cfg.paths.cache_dir = str(Path(run_cfg.paths.cache_dir).expanduser())
    if not run_cfg.judges:
        check_values(run_cfg, backend(run_cfg.judge.kind).config_problems(run_cfg.judge))
    for i, j in enumerate(run_cfg.judges):  # each member as the run's judge; a problem names its place in the panel
        try:
            check_values(replace(run_cfg, judge=j), backend(j.kind).config_problems(j))
        except EmqError as e:
            raise EmqError(f"judge.panel[{i}] ({j.kind.value}): {e.message}",
                           f"in judge.panel[{i}]: {e.fix}" if e.fix else None) from None
    return run_cfg


def panel_members(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> list[JudgeConfig]:
    """judge.panel's judges, each its conf/judge/<OPTION>.yaml on the judge schema, then the command line's judge.*
    overrides (every member takes them: judge.validate=false, judge.cache=false …), then the entry's own fields
    ({name: OPTION, model: …}). Interpolations resolve against the run's config (paths.data_dir …)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries = list(cfg.judge.get("panel") or [])
    if not entries:
        return []
    options = sorted(p.stem for p in (CONF_DIR / "judge").glob("*.yaml"))
    shared = {}
    for o in OverridesParser.create().parse_overrides([o for o in overrides if _key_of(o).startswith("judge.")]):
        key = o.key_or_group.split(".", 1)[1]
        if key.split(".")[0] != "panel" and not o.is_delete():
            shared[key] = o.value()
    members = []
    for i, entry in enumerate(entries):
        own = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else {"name": entry}
        name = own.pop("name", None) if isinstance(own, dict) else None
        if not isinstance(name, str) or name not in options or name == "none":
            raise EmqError(f"judge.panel[{i}]={entry!r} is not a judge option",
                           f"name one of {[o for o in options if o != 'none']} (conf/judge/), or "
                           "{name: OPTION, key: value} to set that judge's fields")
        node = OmegaConf.merge(OmegaConf.structured(JudgeConfig), _option(name))
        try:
            for key, value in shared.items():
                OmegaConf.update(node, key, value, merge=True)
            node = OmegaConf.merge(node, own, {"panel": []})
        except Exception as e:  # an unknown key or a bad value: Hydra's own message names it
            raise EmqError(f"judge.panel[{i}] ({name}): {e}", "use the keys of the judge schema (emq.schema.JudgeConfig)"
                           ) from None
        members.append(_resolved(node, cfg))
    return members


def _option(name: str) -> DictConfig:
    """conf/judge/<name>.yaml with the judge options its defaults list names merged under it (as Hydra would:
    base_judge is the schema, _self_ last)."""
    node = OmegaConf.load(CONF_DIR / "judge" / f"{name}.yaml")
    under = [d for d in node.pop("defaults", None) or [] if isinstance(d, str) and d not in ("base_judge", "_self_")]
    return OmegaConf.merge(*[_option(d) for d in under], node) if under else node


def _resolved(node: DictConfig, cfg: DictConfig) -> JudgeConfig:
    """A panel member as the typed judge, its interpolations (${paths.data_dir} …) resolved in the run's config."""
    scratch = OmegaConf.create({"paths": OmegaConf.to_container(cfg.paths, resolve=True)})
    scratch.judge = node
    return OmegaConf.to_object(scratch.judge)


def resolve_judge_scope(run_cfg: RunConfig, multirun: bool, launcher_target: str) -> RunConfig:
    """judge.scope=auto → sweep for a local judge in a multirun whose jobs run on this machine (the sweep-end
    callback runs here too, so one judge server can serve every variant), else run (a single run, an endpoint
    judge, or SLURM jobs, whose submitting node may have no GPU)."""
    from emq.schema import JudgeScope

    for j in run_cfg.panel():
        if j.scope is JudgeScope.auto:
            shared = multirun and backend(j.kind).shared_by_sweep and "slurm" not in launcher_target.lower()
            j.scope = JudgeScope.sweep if shared else JudgeScope.run
    return run_cfg


def _key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def compose_from_run(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The config a run was made with (its .hydra/overrides.yaml), with `overrides` applied on top.

    A new `judge=...` drops the run's old `judge.*` overrides (they belonged to the other judge).
    """
    import yaml
    from hydra import compose, initialize_config_dir

    saved = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise EmqError(f"{saved} does not exist", "pass a run dir written by `python -m emq`")
    old = list(yaml.safe_load(saved.read_text()) or [])
    new_keys = {_key_of(o) for o in overrides}
    groups = {k for k in new_keys if "." not in k}
    kept = [o for o in old if _key_of(o) not in new_keys and _key_of(o).split(".")[0] not in groups]
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # called from a sweep's end callback, inside Hydra's own app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=kept + list(overrides))
    return to_run_config(cfg, kept + list(overrides))


def _subdir(override_dirname: str) -> str:
    """A sweep job's dir name from its overrides: no '/', at most 80 characters (long ones end in a hash):
    paths in overrides would nest dirs, and names over 255 bytes cannot be created."""
    import hashlib

    name = override_dirname.replace("/", "%")
    if len(name) <= 80:
        return name
    return name[:64] + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


OmegaConf.register_new_resolver("emq_subdir", _subdir, replace=True)

register_configs()
