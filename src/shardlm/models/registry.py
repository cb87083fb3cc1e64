"""Architecture name (config.json ``architectures[0]``) → model class."""

from __future__ import annotations

from shardlm.config import SUPPORTED_ARCHITECTURES, ModelConfig
from shardlm.errors import ConfigError
from shardlm.models.llama import LlamaForCausalLM

# Mistral, Qwen2 and Qwen3 are Llama with flags (sliding window, QKV bias, per-head q/k
# norms), read by ModelConfig.
_MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
assert set(_MODELS) == set(SUPPORTED_ARCHITECTURES)


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    try:
        return _MODELS[config.architecture]
    except KeyError:
        raise ConfigError(
            f"architecture {config.architecture!r} is not supported; "
            f"supported: {', '.join(_MODELS)}"
        ) from None
