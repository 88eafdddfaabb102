"""The error of the RUL estimate the policies act on: the champion's residuals, or a Gaussian."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field



class RulErrorModel(BaseModel):
    """Error of the RUL estimate: the champion's residuals by true-RUL bin, or a Gaussian."""

    kind: Literal["empirical", "gaussian"]
    bin_edges: list[float] = Field(default_factory=list, description="Interior true-RUL edges.")
    residuals: list[list[float]] = Field(default_factory=list, description="pred - true per bin.")
    gaussian_mean: float = 0.0
    gaussian_sd: float = 20.0
    source: str = ""

    @classmethod
    def gaussian(cls, sd: float, mean: float = 0.0, source: str = "fallback") -> "RulErrorModel":
        return cls(kind="gaussian", gaussian_mean=mean, gaussian_sd=sd, source=source)

    @classmethod
    def from_residuals(cls, true_rul, pred_rul, n_bins: int = 5, min_per_bin: int = 10,
                       source: str = "champion") -> "RulErrorModel":
        """Empirical error conditional on the true RUL (quantile bins of ``true_rul``)."""
        t = np.asarray(true_rul, float)
        p = np.asarray(pred_rul, float)
        ok = np.isfinite(t) & np.isfinite(p)
        t, p = t[ok], p[ok]
        if t.size < min_per_bin:
            raise ValueError(f"need >= {min_per_bin} residuals, got {t.size}")
        n_bins = max(1, min(n_bins, t.size // min_per_bin))
        edges = np.unique(np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1]))
        bins = np.searchsorted(edges, t, side="right")
        res = [(p - t)[bins == i].tolist() for i in range(len(edges) + 1)]
        keep = [i for i, r in enumerate(res) if r]
        edges_kept = [float(edges[i - 1]) for i in keep[1:]]
        return cls(kind="empirical", bin_edges=edges_kept, residuals=[res[i] for i in keep], source=source)

    def device_arrays(self, xp) -> dict[str, Any]:
        if self.kind == "gaussian":
            return {}
        counts = np.array([len(r) for r in self.residuals], dtype=np.int64)
        return {"edges": xp.asarray(self.bin_edges, dtype=xp.float64),
                "offsets": xp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), dtype=xp.int64),
                "counts": xp.asarray(counts, dtype=xp.int64),
                "flat": xp.asarray(np.concatenate(self.residuals), dtype=xp.float64)}


def error_model_from_champion(champion: dict | None, fallback_sd: float) -> tuple[RulErrorModel, str | None]:
    """Error model from ``champion_error_model(settings)``'s dict, else the Gaussian fallback.

    Returns:
        ``(model, warning or None)``.
    """
    fallback = RulErrorModel.gaussian(fallback_sd, source=f"fallback: Gaussian(0, {fallback_sd:g})")
    if not champion:
        return fallback, (f"no champion model error distribution found; RUL estimates use the stated "
                          f"fallback error model N(0, {fallback_sd:g}) in the twin's clock unit")
    try:
        src = str(champion.get("model_uri") or champion.get("run_id") or "champion")
        return RulErrorModel.from_residuals(champion["true_rul"], champion["pred_rul"], source=src), None
    except (KeyError, ValueError, TypeError) as exc:
        return fallback, (f"champion error distribution unusable ({exc}); RUL estimates use the stated "
                          f"fallback error model N(0, {fallback_sd:g}) in the twin's clock unit")
