"""The PyTorch trainer: a 1-D CNN over the last ``window`` cycles of each asset.

torch is an optional extra (``pip install 'twinflow[torch]'``) and is imported only when a model
is fitted or used, so listing the trainer is free. The model trains on the GPU when the process
sees one (on a dask-cuda cluster each worker sees exactly one, so one trial uses one GPU) and on
the CPU otherwise. Fitted weights are kept as NumPy arrays: the model pickles and logs the same
whichever device trained it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object


def make_windows(frame: pd.DataFrame, asset: str, cycle: str, columns: list[str], window: int,
                 mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One standardised window per row: the ``window`` cycles of its asset ending at that row.

    Early rows are padded by repeating the asset's first cycle, so every row gets a prediction.
    A missing value (NaN) becomes 0 after standardising, i.e. the training mean: the network needs
    numbers, and the mean carries no signal either way.

    Returns:
        ``(windows, order)``: float32 array ``(n_rows, window, n_features)`` in the row order
        ``order`` (positions into ``frame``, sorted by asset then cycle).
    """
    order = np.lexsort((frame[cycle].to_numpy(), frame[asset].to_numpy()))
    values = np.nan_to_num((frame[columns].to_numpy(dtype="float64") - mean) / std, nan=0.0)
    values = values.astype("float32")[order]
    assets = frame[asset].to_numpy()[order]
    out = np.empty((len(frame), window, len(columns)), dtype="float32")
    bounds = np.flatnonzero(np.r_[True, assets[1:] != assets[:-1], True])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        seq = values[start:stop]
        padded = np.concatenate([np.repeat(seq[:1], window - 1, axis=0), seq])
        # sliding_window_view gives (T, F, window): move time to the middle axis.
        out[start:stop] = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0).transpose(0, 2, 1)
    return out, order


def _build_net(n_features: int, window: int, channels: int, kernel: int, dropout: float):
    import torch.nn as nn

    pad = kernel // 2
    return nn.Sequential(
        nn.Conv1d(n_features, channels, kernel, padding=pad), nn.ReLU(),
        nn.Conv1d(channels, channels, kernel, padding=pad), nn.ReLU(),
        nn.Conv1d(channels, channels // 2, kernel, padding=pad), nn.ReLU(),
        nn.Flatten(), nn.Dropout(dropout),
        nn.Linear((channels // 2) * window, 64), nn.ReLU(), nn.Linear(64, 1),
    )


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class CnnModel:
    """A fitted CNN: weights as NumPy arrays plus what prediction needs (stats, window, cap)."""

    state: dict[str, np.ndarray]
    config: dict[str, Any]
    columns: list[str]
    mean: np.ndarray
    std: np.ndarray
    window: int
    scale: float
    asset: str = "asset_id"
    cycle: str = "cycle"
    history: list[dict[str, float]] = field(default_factory=list)
    best_iteration: int = 0
    device: str = "cpu"
    _net: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_net"] = None  # rebuilt lazily: a live module may sit on a GPU the reader lacks
        return d

    def _module(self):
        import torch

        if self._net is None:
            net = _build_net(len(self.columns), self.window, **self.config)
            net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.state.items()})
            self._net = net.to(_device()).eval()
        return self._net

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Predicted RUL per row of ``frame`` (keys + feature columns), in ``frame``'s order."""
        import torch

        asset = self.asset if self.asset in frame else "asset_id"
        cycle = self.cycle if self.cycle in frame else "cycle"
        x, order = make_windows(frame, asset, cycle, self.columns, self.window, self.mean, self.std)
        net, dev = self._module(), _device()
        out = np.empty(len(x), dtype="float64")
        with torch.no_grad():
            for i in range(0, len(x), 4096):
                xb = torch.from_numpy(x[i:i + 4096]).to(dev).transpose(1, 2)
                out[i:i + 4096] = net(xb).squeeze(1).cpu().numpy() * self.scale
        pred = np.empty_like(out)
        pred[order] = out
        return pred

    def log(self, name: str, example: pd.DataFrame) -> Any:
        """Log as an ``mlflow.pyfunc`` model whose input is keys + features (it needs history)."""
        import mlflow.pyfunc
        from mlflow.models import infer_signature

        from twinflow.tasks.train.trainers import pip_requirements

        cols = ["asset_id", "cycle", *self.columns]
        x = example.rename(columns={self.asset: "asset_id", self.cycle: "cycle"})[cols]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # type-hint advice: the signature is explicit
            return mlflow.pyfunc.log_model(name=name, python_model=CnnPyfunc(self),
                                           signature=infer_signature(x, self.predict(x)), input_example=x,
                                           pip_requirements=pip_requirements("torch", "scikit-learn"))

    def feature_importance(self, frame: pd.DataFrame, true: np.ndarray) -> dict[str, float] | None:
        """Permutation importance on whole columns (windows rebuilt per permutation)."""
        rng = np.random.default_rng(0)
        # A few whole assets keep this to seconds: each column costs one full prediction pass.
        asset = self.asset if self.asset in frame else "asset_id"
        mask = frame[asset].isin(set(frame[asset].drop_duplicates().head(8))).to_numpy()
        frame, true = frame.loc[mask], np.asarray(true)[mask]
        base = float(np.sqrt(np.mean((self.predict(frame) - true) ** 2)))
        out = {}
        for c in self.columns:
            shuffled = frame.copy()
            shuffled[c] = rng.permutation(shuffled[c].to_numpy())
            out[c] = float(np.sqrt(np.mean((self.predict(shuffled) - true) ** 2))) - base
        return out


with warnings.catch_warnings():
    # MLflow advises type hints on predict at class creation; the logged signature is explicit.
    warnings.simplefilter("ignore", UserWarning)

    class CnnPyfunc(_PythonModel):
        """``mlflow.pyfunc`` wrapper: input rows are ``asset_id, cycle, <features>``; one RUL per row."""

        def __init__(self, model: CnnModel):
            self.model = model

        def predict(self, context, model_input, params=None):  # noqa: D401 - MLflow's signature
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            return self.model.predict(frame)


class CnnTrainer:
    """Adam on MSE of RUL / cap, early-stopped on the by-asset validation split (per epoch)."""

    name = "cnn"
    #: Trials ask the cluster for a GPU worker when it has one (twinflow.runtime.gpu_resources).
    uses_gpu = True
    default_space: dict[str, list[Any]] = {
        "lr": [1e-3, 2e-3, 5e-3],
        "channels": [32, 64],
        "kernel": [3, 5, 7],
        "dropout": [0.0, 0.2],
        "batch_size": [128, 256, 512],
    }

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, spec, hparams: dict[str, Any], params, seed: int) -> CnnModel:
        import torch

        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        cols = list(spec.feature_columns)
        hp = {**{k: v[0] for k, v in self.default_space.items()}, **hparams}
        x = train[cols].to_numpy(dtype="float64")
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: mean 0, scale 1 below
            mean = np.nanmean(x, axis=0)
            std = np.nanstd(x, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        scale = float(params.rul_cap)
        xtr, otr = make_windows(train, spec.asset, spec.cycle, cols, params.window, mean, std)
        ytr = (train[spec.label].to_numpy()[otr] / scale).astype("float32")
        xva, ova = make_windows(val, spec.asset, spec.cycle, cols, params.window, mean, std)
        yva = val[spec.label].to_numpy()[ova]
        dev = _device()
        config = {"channels": int(hp["channels"]), "kernel": int(hp["kernel"]), "dropout": float(hp["dropout"])}
        net = _build_net(len(cols), params.window, **config).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=float(hp["lr"]))
        xtr_t = torch.from_numpy(xtr).transpose(1, 2).contiguous().to(dev)
        ytr_t = torch.from_numpy(ytr).to(dev)
        xva_t = torch.from_numpy(xva).transpose(1, 2).contiguous().to(dev)
        bs = int(hp["batch_size"])
        history: list[dict[str, float]] = []
        best = (math.inf, 0, None)
        stale = 0
        for epoch in range(1, params.max_iter + 1):
            net.train()
            perm = torch.from_numpy(rng.permutation(len(xtr))).to(dev)
            total = 0.0
            for i in range(0, len(perm), bs):
                idx = perm[i:i + bs]
                opt.zero_grad()
                loss = torch.mean((net(xtr_t[idx]).squeeze(1) - ytr_t[idx]) ** 2)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            net.eval()
            with torch.no_grad():
                pva = torch.cat([net(xva_t[i:i + 4096]).squeeze(1) for i in range(0, len(xva_t), 4096)]).cpu().numpy()
            val_rmse = float(np.sqrt(np.mean((pva * scale - yva) ** 2)))
            history.append({"step": epoch, "val_rmse": val_rmse, "train_rmse": math.sqrt(total / len(perm)) * scale})
            if val_rmse < best[0] - 1e-9:
                best = (val_rmse, epoch, {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()})
                stale = 0
            else:
                stale += 1
                if stale >= params.early_stopping_rounds:
                    break
        return CnnModel(best[2], config, cols, mean, std, params.window, scale, spec.asset, spec.cycle,
                        history, best[1], device=str(dev))
