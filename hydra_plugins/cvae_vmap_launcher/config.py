"""The `hydra/launcher=vmap` config, registered when Hydra scans the hydra_plugins namespace."""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class VmapLauncherConf:
    _target_: str = "hydra_plugins.cvae_vmap_launcher.vmap_launcher.VmapLauncher"
    # The most jobs trained as one program; a larger partition is cut into chunks of this size. null: no cap.
    max_members: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="vmap", node=VmapLauncherConf, provider="cvae_exp")
