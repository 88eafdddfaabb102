"""``python -m twinflow.deployments serve|backfill|blocks``: the deployment commands standalone."""

from twinflow.deployments.cli import main

if __name__ == "__main__":
    main()
