"""cvae_exp's Hydra launcher plugin: `cvae-train -m hydra/launcher=vmap ...` (see cvae_exp/runs/vmap_sweep.py)."""
