"""The fused GPU kernel (CuPy RawKernel): every policy of a batch in one launch.

One thread per (policy, slot) lane keeps its state in registers; results match
:func:`twinflow.tasks.twin.policies.simulate_batch` in distribution (not bit for bit). A step of the
kernel's loop is one unit of the twin's clock (``TwinModel.time_unit``), as in the NumPy kernel.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from twinflow.tasks.twin.model import CostModel, TwinModel, seed_sequence, to_numpy
from twinflow.tasks.twin.policies import OUTPUTS, Policy
from twinflow.tasks.twin.rul_error import RulErrorModel



_FUSED_SRC = r"""
typedef unsigned long long u64;

__device__ __forceinline__ u64 mix64(u64 x) {
    // splitmix64 finaliser: a bijective avalanche of the counter.
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27; x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

__device__ __forceinline__ u64 ctr_hash(u64 key, u64 stream, u64 slot, u64 step) {
    return mix64(mix64(key ^ (stream * 0x9E3779B97F4A7C15ULL)) + slot * 0xD1B54A32D192ED03ULL
                 + step * 0x8CB92BA72F3D8DD7ULL);
}

__device__ __forceinline__ float u01(unsigned int bits24) {
    return ((float)bits24 + 0.5f) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ float normal(u64 h) {
    float u1 = u01((unsigned int)(h >> 40));
    float u2 = u01((unsigned int)(h & 0xFFFFFFULL));
    return sqrtf(-2.0f * __logf(u1)) * __cosf(6.283185307f * u2);
}

struct Unit { float a, b, c, tau_f; };

__device__ __forceinline__ Unit draw_unit(u64 key, u64 slot, u64 j, float mu, float sd_a, float b_mean,
                                          float b_sd, float d_scale) {
    float z0 = normal(ctr_hash(key, 10, slot, 3 * j));
    float z1 = normal(ctr_hash(key, 10, slot, 3 * j + 1));
    float z2 = normal(ctr_hash(key, 10, slot, 3 * j + 2));
    float log_a = mu + sd_a * z0;
    float b = fminf(fmaxf(b_mean + b_sd * z1, 0.3f), 6.0f);
    float d = fminf(d_scale * fabsf(z2), 0.9f);
    Unit u;
    u.a = __expf(log_a);
    u.b = b;
    u.c = __logf(2.0f - d);
    u.tau_f = __expf((__logf(u.c) - log_a) / b);
    return u;
}

extern "C" __global__ void twin_policy_kernel(
    const float* interval, const float* threshold, const int* predictive, int n_pol, long long n_slots,
    int horizon, int inspect_every, u64 key,
    float mu, float sd_a, float b_mean, float b_sd, float d_scale, float sigma,
    int n_regimes, const float* cum_probs, const float* severity, float mean_sev,
    int err_kind, float g_mean, float g_sd, int n_bins, const float* edges, const long long* offsets,
    const long long* counts, const float* flat,
    int fail_down, int plan_down,
    int* out_fail, int* out_plan, int* out_down)
{
    long long lane = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (lane >= (long long)n_pol * n_slots) return;
    int p = (int)(lane / n_slots);
    u64 slot = (u64)(lane % n_slots);
    float k = interval[p], thr = threshold[p];
    int pred = predictive[p];
    u64 j = 0;
    Unit u = draw_unit(key, slot, j, mu, sd_a, b_mean, b_sd, d_scale);
    float tau = 0.0f;
    int resume = 1, nf = 0, np_ = 0, nd = 0;
    for (int t = 1; t <= horizon; ++t) {
        int age = t + 1 - resume;
        if (age <= 0) continue;
        float sev = severity[0];
        if (n_regimes > 1) {
            float r = u01((unsigned int)(ctr_hash(key, 2, slot, t) >> 40));
            int g = 0;
            while (g < n_regimes - 1 && r >= cum_probs[g]) ++g;
            sev = severity[g];
        }
        tau += sev;
        float x = u.a * __powf(tau, u.b);
        float z = normal(ctr_hash(key, 1, slot, t));
        bool fail = x >= u.c - sigma * z;
        bool plan = !fail && (float)age >= k;
        if (!fail && !plan && pred && (t % inspect_every) == 0) {
            float rul = (u.tau_f - tau) / mean_sev;
            u64 h = ctr_hash(key, 3, slot, t);
            float e;
            if (err_kind == 0) {
                e = g_mean + g_sd * normal(h);
            } else {
                int bin = 0;
                while (bin < n_bins - 1 && rul >= edges[bin]) ++bin;
                long long cnt = counts[bin];
                long long idx = (long long)(u01((unsigned int)(h >> 40)) * (float)cnt);
                if (idx > cnt - 1) idx = cnt - 1;
                e = flat[offsets[bin] + idx];
            }
            plan = rul + e <= thr;
        }
        if (fail || plan) {
            int dur = fail ? fail_down : plan_down;
            nf += fail; np_ += plan;
            nd += min(dur, horizon - t);
            resume = t + 1 + dur;
            ++j;
            u = draw_unit(key, slot, j, mu, sd_a, b_mean, b_sd, d_scale);
            tau = 0.0f;
        }
    }
    out_fail[lane] = nf; out_plan[lane] = np_; out_down[lane] = nd;
}
"""


@lru_cache(maxsize=1)
def _fused_kernel():
    import cupy

    return cupy.RawKernel(_FUSED_SRC, "twin_policy_kernel", options=("--use_fast_math",))


def fused_kernel_args(model: TwinModel, policies: Sequence[Policy], costs: CostModel, n_scenarios: int,
                      n_assets: int, horizon: int, seed: int | np.random.SeedSequence,
                      error_model: RulErrorModel, *, inspect_every: int = 10, xp=np) -> tuple[tuple, dict, int]:
    """Arguments of ``twin_policy_kernel`` in ``_FUSED_SRC`` order, as ``xp`` arrays and NumPy scalars.

    Returns:
        ``(args, outputs, lanes)``: ``outputs`` are the int32 per-lane counters the kernel fills.
    """
    ss = seed_sequence(seed)
    n_pol, n_slots = len(policies), n_scenarios * n_assets
    f32 = np.float32
    interval = xp.asarray([p.value if p.kind == "fixed_interval" else 3.0e38 for p in policies], f32)
    threshold = xp.asarray([p.value if p.kind == "predictive" else -3.0e38 for p in policies], f32)
    predictive = xp.asarray([p.kind == "predictive" for p in policies], np.int32)
    cum = xp.asarray(np.r_[np.cumsum(model.regime_probs)[:-1], 2.0], f32)
    sev = xp.asarray(model.regime_severity, f32)
    if error_model.kind == "empirical":
        counts = np.array([len(r) for r in error_model.residuals], np.int64)
        edges = xp.asarray(np.r_[error_model.bin_edges, 3.0e38], f32)
        offsets = xp.asarray(np.r_[0, np.cumsum(counts)[:-1]], np.int64)
        counts_d = xp.asarray(counts)
        flat = xp.asarray(np.concatenate(error_model.residuals), f32)
        err_kind, n_bins = 1, len(counts)
    else:
        edges, offsets, counts_d = xp.zeros(1, f32), xp.zeros(1, np.int64), xp.ones(1, np.int64)
        flat, err_kind, n_bins = xp.zeros(1, f32), 0, 1
    lanes = n_pol * n_slots
    out = {k: xp.zeros(lanes, np.int32) for k in OUTPUTS}
    key = np.uint64(ss.generate_state(1, np.uint64)[0])
    args = (interval, threshold, predictive, np.int32(n_pol), np.int64(n_slots), np.int32(horizon),
            np.int32(inspect_every), key, f32(model.log_a_mean), f32(model.log_a_sd), f32(model.b_mean),
            f32(model.b_sd), f32(model.d_scale), f32(model.process_noise), np.int32(model.n_regimes), cum, sev,
            f32(model.mean_severity), np.int32(err_kind), f32(error_model.gaussian_mean),
            f32(error_model.gaussian_sd), np.int32(n_bins), edges, offsets, counts_d, flat,
            np.int32(costs.failure_downtime), np.int32(costs.planned_downtime),
            out["failures"], out["planned"], out["downtime"])
    return args, out, lanes


def fused_kernel_results(out: dict, n_pol: int, n_scenarios: int, n_assets: int, costs: CostModel) -> dict[str, np.ndarray]:
    """Per-(policy, scenario) fleet totals from the kernel's per-lane counters."""
    res = {k: to_numpy(v.reshape(n_pol, n_scenarios, n_assets).sum(axis=2, dtype=np.int64))
           for k, v in out.items()}
    res["cost"] = (costs.failure * res["failures"] + costs.planned * res["planned"]
                   + costs.downtime_per_cycle * res["downtime"])
    return res


def simulate_batch_fused(model: TwinModel, policies: Sequence[Policy], costs: CostModel, n_scenarios: int,
                         n_assets: int, horizon: int, seed: int | np.random.SeedSequence,
                         error_model: RulErrorModel, *, inspect_every: int = 10) -> dict[str, np.ndarray]:
    """GPU version of :func:`simulate_batch`: one fused CUDA kernel, one thread per lane.

    Same model, policies and outputs; float32 state kept in registers across all cycles and a
    counter-based random stream (splitmix64 of seed, stream, slot, cycle), so draws are shared by
    a slot's policy lanes (common random numbers) without storing them. Results are deterministic
    for a seed but are not the NumPy kernel's numbers: they agree in distribution.
    """
    import cupy

    args, out, lanes = fused_kernel_args(model, policies, costs, n_scenarios, n_assets, horizon, seed,
                                         error_model, inspect_every=inspect_every, xp=cupy)
    threads = 256
    _fused_kernel()(((lanes + threads - 1) // threads,), (threads,), args)
    return fused_kernel_results(out, len(policies), n_scenarios, n_assets, costs)
