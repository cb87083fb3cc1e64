"""Model configuration read from a Hugging Face ``config.json``.

One dataclass covers Llama, Mistral, Qwen2 and Qwen3 (dense): they differ only in flags (QKV
bias, sliding window, tied embeddings, per-head q/k norms), so the model code stays a single
implementation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardlm.errors import ConfigError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
# Architectures whose sliding window is switched by ``use_sliding_window`` (Qwen's spelling).
QWEN_WINDOWED = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from either HF spelling.

    transformers < 5 writes ``rope_theta`` + ``rope_scaling``; transformers >= 5 writes a single
    ``rope_parameters`` dict. Checkpoints in the wild use both.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN (layers/rotary.py): the ramp's bounds in rotations, and the cos/sin scale — given,
    # or from factor (and mscale / mscale_all_dim where both are given).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: RMSNorm over each head's channels of q and of k (own weights [head_dim]), before
    # RoPE.
    qk_norm: bool = False
    # Per-layer sliding-window size (None = full attention).
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def max_context(self) -> int:
        """The longest sequence the checkpoint supports: max_position_embeddings, or for YaRN
        original_max_position_embeddings × factor where that is longer (vLLM's rule: Qwen2.5
        and Qwen3 keep 32768 / 40960 there and reach 4× with YaRN switched on)."""
        if self.rope.rope_type == "yarn":
            scaled = int(self.rope.original_max_position_embeddings * self.rope.factor)
            return max(self.max_position_embeddings, scaled)
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count, for sizing reports and benchmarks."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        per_layer = attn + 3 * h * i + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        heads = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + heads + h

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(
                f"no config.json in {path} (expected a Hugging Face checkpoint directory)"
            )
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file} is not valid JSON: {e}") from None
        generation = {}
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            try:
                generation = json.loads(gen_file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{gen_file} is not valid JSON: {e}") from None
        return cls.from_dict(raw, generation, source=str(config_file))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config"
    ) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: architecture {arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return raw[key]

        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported; supported: 'silu'")

        hidden = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        n_kv = int(raw.get("num_key_value_heads") or n_heads)
        head_dim = raw.get("head_dim") or hidden // n_heads
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            # RoPE rotates channel pairs (i, i + head_dim/2).
            raise ConfigError(f"{source}: head_dim must be an even integer ≥ 2, got {head_dim!r}")
        if n_heads % n_kv != 0:
            raise ConfigError(
                f"{source}: num_attention_heads={n_heads} is not a multiple of "
                f"num_key_value_heads={n_kv}"
            )
        n_layers = int(need("num_hidden_layers"))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = raw.get("attention_bias") or False
        if not isinstance(attention_bias, bool):
            raise ConfigError(
                f"{source}: attention_bias must be true or false, got {attention_bias!r}"
            )

        generation = generation or {}
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        bos = generation.get("bos_token_id", raw.get("bos_token_id"))

        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_parse_rope(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_windows=_parse_sliding_windows(raw, n_layers, arch in QWEN_WINDOWED, source),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=raw,
        )


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}

    def kind(d: dict) -> str:
        return d.get("rope_type", d.get("type", "default"))

    if params and scaling and kind(params) != kind(scaling):
        # transformers 5 saves rope_parameters (rope_type "default" and rope_theta); a
        # rope_scaling added by hand, as Qwen's docs say to switch YaRN on, is meant to win.
        # Two different scalings: which one is meant is not known.
        if kind(params) != "default":
            raise ConfigError(
                f"{source}: rope_parameters ({kind(params)!r}) and rope_scaling "
                f"({kind(scaling)!r}) disagree; keep one of them"
            )
        params = {**params, **scaling}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 1):
        raise ConfigError(f"{source}: rope_theta must be a number > 1, got {theta!r}")
    rope_type = kind(params)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type not in ("llama3", "yarn"):  # the only ones reading the fields below
        factor = _rope_factor(params.get("factor", 1.0), rope_type, source)
        return RopeConfig(theta=float(theta), rope_type=rope_type, factor=factor)
    # As transformers: a top-level original_max_position_embeddings (Phi-3's spelling) wins.
    original = raw.get(
        "original_max_position_embeddings",
        params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 2048)),
    )
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise ConfigError(
            f"{source}: rope original_max_position_embeddings must be an integer ≥ 1, "
            f"got {original!r}"
        )
    if "factor" not in params:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs a factor")
    factor = params["factor"]
    if factor is None and rope_type == "yarn":  # DeepSeek-V3's spelling: the length ratio
        factor = raw.get("max_position_embeddings", 2048) / original
    factor = _rope_factor(factor, rope_type, source)

    def optional(key: str, minimum_exclusive: bool = False) -> float | None:
        value = params.get(key)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0):
            bound = "> 0" if minimum_exclusive else "≥ 0"
            raise ConfigError(f"{source}: rope {key} must be a number {bound}, got {value!r}")
        return float(value)

    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=optional("beta_fast") or 32.0,  # transformers: a 0 or null means the default
        beta_slow=optional("beta_slow") or 1.0,
        attention_factor=optional("attention_factor", minimum_exclusive=True),
        mscale=optional("mscale"),
        mscale_all_dim=optional("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _rope_factor(value: Any, rope_type: str, source: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if rope_type != "default" and not (ok and math.isfinite(value) and value > 0):
        raise ConfigError(f"{source}: rope scaling factor must be > 0, got {value!r}")
    return float(value) if ok else 1.0


def _parse_sliding_windows(
    raw: dict[str, Any], n_layers: int, qwen: bool, source: str
) -> tuple[int | None, ...]:
    """Which layers attend through a sliding window, and how wide it is.

    Mistral: ``sliding_window`` applies to every layer (or as ``layer_types`` says). Qwen2 and
    Qwen3, as transformers reads them: no window at all unless ``use_sliding_window``; then
    the layers ``layer_types`` marks "sliding_attention", or without it the layers from
    ``max_window_layers`` on (transformers' default 28 when the field is absent).
    """
    window = raw.get("sliding_window")
    if not window or (qwen and not raw.get("use_sliding_window", False)):
        return (None,) * n_layers
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    layer_types = raw.get("layer_types")
    if layer_types:
        allowed = ("full_attention", "sliding_attention")
        bad = [t for t in layer_types if t not in allowed]
        if bad or len(layer_types) != n_layers:
            raise ConfigError(
                f"{source}: layer_types must list one of {', '.join(allowed)} for each of the "
                f"{n_layers} layers, got {layer_types!r}"
            )
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if qwen:
        first = int(raw.get("max_window_layers", 28))
        return tuple(window if i >= first else None for i in range(n_layers))
    return (window,) * n_layers
