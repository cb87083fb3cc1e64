"""shardlm: an LLM inference engine for Llama-family models."""

from shardlm.engine.llm import LLM
from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine_config import EngineConfig
from shardlm.structured import StructuredOutputs

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputs",
    "__version__",
]
