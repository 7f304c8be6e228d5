"""A run on disk: its launch and record, its directory and lock, resume, checkpoints, metrics.json and
TensorBoard, and the runner that trains one job (or a vmap group of jobs) from a composed config."""
