"""twinflow.flows."""
