"""`python -m emq [overrides]`: compose the config, hand the typed run object to the runner."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from emq.config import to_run_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from emq.runner import run

    hc = HydraConfig.get()
    status = run(to_run_config(cfg), Path(hc.runtime.output_dir))
    if status.status != "ok" and hc.mode == RunMode.RUN:
        sys.exit(2)


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    main()
