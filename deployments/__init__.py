"""twinflow.deployments."""
