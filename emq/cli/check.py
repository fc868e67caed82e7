"""`python -m emq check [overrides]`: can this installation do what this config needs?

The original tool's test_quantization.py, made specific: it composes the same config as
`python -m emq` and checks each piece that config will use — torch, vLLM and its quant method,
bitsandbytes NF4, the model references, disk — without loading model weights.
Exit code 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from emq.errors import EmqError
from emq.schema import QuantMethod, RunConfig


def _torch() -> str:
    import torch

    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no CUDA"
    return f"torch {torch.__version__} ({cuda})"


def _vllm_import() -> str:
    t0 = time.perf_counter()
    import vllm

    return f"vllm {vllm.__version__} imports ({time.perf_counter() - t0:.1f} s)"


def _quant(cfg: RunConfig) -> Callable[[], str]:
    def check() -> str:
        from emq.machine import snapshot
        from emq.plan import resolve_quant

        reasons: list[str] = []
        choice = resolve_quant(cfg.quant, cfg.memory, snapshot(cfg.paths.cache_dir), reasons)
        return reasons[-1] if reasons else f"quant={choice.method.value}"
    return check


def _bnb_provider() -> str:
    """What serves quantization="bitsandbytes" in this vLLM: found from the installed files and entry points, then
    confirmed in vLLM's own quantization registry after its plugins load."""
    from emq.machine import installed_vllm, probe_bnb

    provider = probe_bnb(*installed_vllm())
    if provider.kind is None:
        raise EmqError(f"vLLM cannot serve bitsandbytes here: {provider.why_not}", provider.fix)
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    try:
        get_quantization_config("bitsandbytes")
    except ValueError as e:
        raise EmqError(f"{provider.name} {provider.version} is installed, but vLLM's quantization registry has no "
                       f"'bitsandbytes' after loading its plugins ({e})", provider.fix) from None
    return (f"{provider.name} {provider.version} registers 'bitsandbytes' in vLLM's quantization registry "
            f"(bitsandbytes {provider.bitsandbytes})")


def _bnb_nf4() -> str:
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(256, 256, dtype=torch.bfloat16, device=device)
    packed, state = quantize_4bit(w, quant_type="nf4", blocksize=64)
    err = (dequantize_4bit(packed, state) - w).abs().mean().item() / w.abs().mean().item()
    if err > 0.2:
        raise EmqError(f"bitsandbytes NF4 round trip on {device} has relative error {err:.2f}",
                       "reinstall bitsandbytes (pip install -U bitsandbytes)")
    return f"NF4 round trip on {device}: relative error {err:.3f}"


def _model(cfg: RunConfig) -> Callable[[], str]:
    def check() -> str:
        from emq.demo import demo_built, demo_paths
        from emq.detect import detect

        if cfg.model.demo:
            paths = demo_paths(cfg.paths.data_dir)
            if not demo_built(cfg.paths.data_dir):
                return f"demo not built yet: the first run builds it into {paths.root} (~2.5 min)"
        det = detect(cfg.model)
        return (f"{det.base.architecture}, adapter r={det.adapter.rank}, trained_in_4bit={det.trained_in_4bit}"
                if det.adapter else f"{det.base.architecture}, no adapter")
    return check


def checks(cfg: RunConfig) -> list[tuple[str, Callable[[], str]]]:
    """The checks this config needs, in order."""
    out = [("torch", _torch), ("vLLM", _vllm_import), (f"quant={cfg.quant.method.value}", _quant(cfg)),
           (f"model={cfg.model.name}", _model(cfg))]
    if cfg.quant.method in (QuantMethod.bnb, QuantMethod.auto) or (cfg.model.trained_in_4bit is not False):
        out.insert(2, ("bitsandbytes", _bnb_nf4))
    if cfg.quant.method is QuantMethod.bnb:
        out.insert(2, ("vLLM bitsandbytes", _bnb_provider))
    return out


def run_checks(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """Run every check; a failure is recorded, never raised."""
    results = []
    for name, fn in checks(cfg):
        try:
            results.append((name, True, fn()))
        except EmqError as e:
            results.append((name, False, str(e)))
        except Exception as e:  # an import or driver failure is exactly what this command reports
            results.append((name, False, f"{type(e).__name__}: {e}"))
    return results


def main(argv: list[str] | None = None) -> int:
    """Compose the config the overrides name and run every check it needs; 1 if one fails."""
    import argparse

    from hydra import compose, initialize_config_dir

    from emq.config import CONF_DIR, to_run_config
    from emq.report.tables import summary_table

    parser = argparse.ArgumentParser(prog="python -m emq check", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="the run's Hydra overrides, e.g. quant=bnb model=good_doctor")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = to_run_config(compose(config_name="config", overrides=args.overrides), args.overrides)
        except EmqError as e:
            print(summary_table([("error", e.message), ("fix", e.fix or "")], "emq check"), file=sys.stderr)
            return 2
    results = run_checks(cfg)
    rows = [(f"{'ok  ' if ok else 'FAIL'} {name}", msg) for name, ok, msg in results]
    print(summary_table(rows, "emq check"))  # a CLI's output, not a log
    return 0 if all(ok for _, ok, _ in results) else 1
