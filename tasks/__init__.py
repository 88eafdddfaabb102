"""twinflow.tasks."""
