"""twinflow.blocks."""
