"""Which per-layer scales an fp8 KV cache gets: calibrated when the model's calibration file
has KV statistics (``shardlm calibrate``), else 1.0.

The file is the one ARM smoothing reads when it is on (``arm_calibration``, resolved), else
the model's own (``calibration.find_calibration``: per-user, then beside the checkpoint). A
draft model runs with its own path, so it gets its own calibration or 1.0.

Under tensor parallelism (and on attention nodes) every rank and node uses the same scale
per layer: the max over all KV heads of the full model, as the file records them. A rank's
heads are then stored exactly as with one rank, so the tensor-parallel size does not change
what the cache holds.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from shardlm.cache.kv_quant import Fp8Scales
from shardlm.calibration import find_calibration, load_kv_absmax
from shardlm.config import ModelConfig
from shardlm.engine_config import EngineConfig

logger = logging.getLogger(__name__)


def fp8_kv_scales(engine: EngineConfig, config: ModelConfig) -> Fp8Scales | None:
    """The scales of this model's fp8 KV pools, or None when kv_cache_dtype is not fp8.
    ``engine``: resolved (EngineConfig.resolve)."""
    if engine.cache.kv_cache_dtype != "fp8":
        return None
    model = engine.model.model
    path = engine.quantization.arm_calibration or find_calibration(model)
    absmax = load_kv_absmax(path, config) if path is not None else None
    if absmax is None:
        scales = Fp8Scales.unit(config.num_hidden_layers)
        why = f"{path} has no KV statistics" if path else "no calibration file"
        _log(f"fp8 KV cache of {model}: scales 1.0 ({why}; `shardlm calibrate` records them)")
        return scales
    k_absmax, v_absmax = ([float(t.max()) for t in tables] for tables in absmax)
    scales = Fp8Scales.calibrated(k_absmax, v_absmax, str(Path(path)))
    _log(
        f"fp8 KV cache of {model}: calibrated scales from {path} (K {min(scales.k):.3g}–"
        f"{max(scales.k):.3g}, V {min(scales.v):.3g}–{max(scales.v):.3g})"
    )
    return scales


@functools.cache  # once per process, not once per pool
def _log(message: str) -> None:
    logger.info(message)
