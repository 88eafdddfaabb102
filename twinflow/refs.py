"""References passed between stages: paths, ids and URIs, never data frames.

Each stage flow takes one params model and returns one of these; the next stage reads the data
the reference points at. They are small, JSON-serialisable and safe to persist as Prefect results.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from twinflow.contract.model import ContractRef, FleetContract


class FileRef(BaseModel):
    """One ingested source file."""

    path: str
    sha256: str
    rows_read: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    status: str = "ingested"
    lake_file: str | None = Field(
        None, description="Stable id of the source (its file id); its rows carry source_file=path."
    )


class LakeSnapshot(BaseModel):
    """A dataset in the lake at one table version (see ``twinflow/lake.py``), with the files it came from."""

    lake_path: str = Field(description="Root of the lake: one Delta table per dataset.")
    dataset: str = Field(description="Dataset name: the lake's table <lake>/<name>.")
    batch_id: str
    files: list[FileRef] = Field(default_factory=list)
    rows: int = 0
    version: int | None = Field(
        None, description="Delta table version the snapshot names; None reads the latest version.")
    contract: FleetContract | None = Field(
        None, description="The fleet contract of the table's data (what its columns, clock and units are).")
    segments: int | None = Field(
        None, description="Version of the dataset's life-segments table (<dataset>__segments) that goes "
        "with this snapshot; None: the dataset has none.")

    @property
    def dataset_path(self) -> str:
        """The dataset's table URI."""
        return f"{self.lake_path.rstrip('/')}/{self.dataset}"

    @property
    def digest(self) -> str:
        """Content digest of the snapshot: changes when any contributing file changes."""
        import hashlib

        h = hashlib.sha256(self.dataset.encode())
        for f in sorted(self.files, key=lambda f: f.sha256):
            h.update(f.sha256.encode())
        return h.hexdigest()[:16]


class FeatureSetRef(BaseModel):
    """A feature dataset written by the features stage."""

    path: str
    snapshot: LakeSnapshot
    feature_columns: list[str]
    label_column: str | None = "rul"
    key_columns: list[str] = Field(default_factory=lambda: ["asset_id", "cycle"],
                                   description="(asset_id, the clock's key: cycle or timestamp).")
    rows: int = 0
    params_digest: str = ""
    contract: ContractRef | None = Field(
        None, description="The fleet contract (name, version, digest) the features were computed under.")
    time_unit: str = Field("cycle", description="Unit of the label and of every duration feature: the "
                           "contract clock's (cycle, or s/min/h/d for a timestamp clock).")


def contract_tags(ref: ContractRef | None) -> dict[str, str]:
    """MLflow run tags naming the fleet contract a result was produced under (empty when unknown)."""
    if ref is None:
        return {}
    return {"twinflow.contract.name": ref.name, "twinflow.contract.version": str(ref.version),
            "twinflow.contract.digest": ref.digest}


class TrainResult(BaseModel):
    """A trained model: the MLflow run, the model URI and its registry version."""

    run_id: str
    model_uri: str
    registered_model: str | None = None
    version: str | None = None
    aliases: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class SimulationResult(BaseModel):
    """The outcome of a digital-twin policy study."""

    run_id: str
    recommended_policy: str
    expected_cost: float
    policies: list[dict] = Field(default_factory=list)
