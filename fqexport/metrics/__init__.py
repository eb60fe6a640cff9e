"""Per-group metrics (one object everywhere) and disparity diagnostics."""
