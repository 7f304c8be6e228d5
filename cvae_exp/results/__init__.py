"""What finished runs show: sweeps read from disk and the paper's table."""
