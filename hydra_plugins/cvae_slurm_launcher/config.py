"""The schema of `hydra/launcher=slurm` and `vmap_slurm` (conf/hydra/launcher/{slurm,vmap_slurm}.yaml):
hydra-submitit-launcher's SLURM keys plus the vmap launcher's `max_members` (only vmap_slurm takes it: one
schema, so that vmap_slurm.yaml can take every resource from slurm.yaml). Registered when Hydra scans the
hydra_plugins namespace."""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

try:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
except ImportError:  # without the [cluster] extra
    SlurmQueueConf = None

if SlurmQueueConf is not None:

    @dataclass
    class SlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.cvae_slurm_launcher.slurm_launcher.SlurmLauncher"
        # vmap_slurm: the most jobs trained as one program; a larger partition is cut into chunks of this size.
        max_members: Optional[int] = None

    ConfigStore.instance().store(group="hydra/launcher", name="slurm_schema", node=SlurmConf, provider="cvae_exp")
