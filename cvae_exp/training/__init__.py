"""Training in memory: the experiment a config builds, the devices, the pure jitted steps, the members of
a vmapped group, the optimizer and the loop; nothing here writes files."""
