"""cvae_exp's SLURM launcher plugins: `hydra/launcher=slurm` (hydra-submitit-launcher's, with the cluster checked
first and job states read without an accounting database: cvae_exp.slurm) and `hydra/launcher=vmap_slurm` (the
vmap launcher's partitions, one SLURM job each: cvae_exp.vmap_slurm). Both need hydra-submitit-launcher
(pip install -e ".[cluster]")."""
