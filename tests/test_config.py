"""EngineConfig: each option declared once, and reachable from Python, the CLI, the workers
and the docs."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from shardlm import LLM, EngineConfig
from shardlm.engine.llm_engine import LLMEngine
from shardlm.engine_config import GROUP_TITLES
from shardlm.entrypoints.cli import build_parser
from shardlm.entrypoints.openai.server_config import ServerConfig
from shardlm.errors import ParamError
from shardlm.options import kwargs_from, option_fields

ROOT = Path(__file__).resolve().parents[1]
ENGINE_OPTIONS = option_fields(EngineConfig)

# A value other than the default for each option, as it is typed on a command line.
SPEC_JSON = '{"method": "ngram", "num_speculative_tokens": 2}'
FLAG_VALUES = {
    "model": ("/ckpt", "/ckpt"),
    "tokenizer": ("/tok", "/tok"),
    "dtype": ("bfloat16", "bfloat16"),
    "device": ("cpu", "cpu"),
    "seed": ("7", 7),
    "max_model_len": ("64", 64),
    "load_format": ("dummy", "dummy"),
    "kv_cache_tokens": ("512", 512),
    "memory_utilization": ("0.5", 0.5),
    "block_size": ("32", 32),
    "kv_cache_dtype": ("int8", "int8"),
    "max_num_batched_tokens": ("99", 99),
    "max_num_seqs": ("3", 3),
    "tensor_parallel_size": ("2", 2),
    "tp_timeout_s": ("5", 5.0),
    "attention_nodes": ("2", 2),
    "kv_chunk_size": ("4", 4),
    "attention_device": ("cpu", "cpu"),
    "attention_transport": ("in-process", "in-process"),
    "compute_nodes": ("2", 2),
    "compute_chunk_size": ("4", 4),
    "node_microbatches": ("2", 2),
    "attention_link": ("gloo", "gloo"),
    "attention_backend": ("torch", "torch"),
    "quantization": ("int8", "int8"),
    "arm": ("hadamard", "hadamard"),
    "arm_calibration": ("/cal.safetensors", "/cal.safetensors"),
    "speculative_config": (SPEC_JSON, SPEC_JSON),
}


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_option_names_are_unique_across_groups():
    names = [f.name for f in ENGINE_OPTIONS]
    assert len(names) == len(set(names))
    assert {f.group for f in ENGINE_OPTIONS} == set(GROUP_TITLES)


@pytest.mark.parametrize("command", ["generate", "serve", "eval"])
def test_every_option_is_a_flag_of_each_engine_command(command):
    sub = subparser(command)
    required = ["--data", "x"] if command == "eval" else []
    for f in ENGINE_OPTIONS:
        if command == "generate" and f.name == "seed":
            continue  # generate's --seed seeds its request
        if f.base_type is bool:
            argv = [f.flag if not f.default else "--no-" + f.flag[2:]]
            want = not f.default
        else:
            text, want = FLAG_VALUES[f.name]
            argv = [f.flag, text]
        args = sub.parse_args(required + argv)
        assert kwargs_from(args, EngineConfig) == {f.name: want}, f.name
        squeezed = "".join(sub.format_help().split())  # argparse wraps (also at hyphens)
        assert "".join(f"(default: {f.default_text})".split()) in squeezed, f.name


def test_flags_not_given_are_not_passed_on():
    assert kwargs_from(subparser("eval").parse_args(["--data", "x"]), EngineConfig) == {}
    args = subparser("generate").parse_args(["--seed", "3"])
    assert kwargs_from(args, EngineConfig) == {}  # the request's seed, not the engine's
    assert args.seed == 3


def test_server_options_are_flags_of_serve():
    sub = subparser("serve")
    args = sub.parse_args(["--port", "9", "--max-waiting", "4", "--api-key", "k"])
    assert kwargs_from(args, ServerConfig) == {"port": 9, "max_waiting": 4, "api_key": "k"}


def test_unknown_option_is_named_with_the_closest_valid_names(tmp_path):
    with pytest.raises(ParamError, match="unknown option 'block_sise'; did you mean block_size"):
        LLM(str(tmp_path), block_sise=32)
    with pytest.raises(ParamError, match="LLMEngine got an unknown option 'tensor_parallel'"):
        LLMEngine(str(tmp_path), tensor_parallel=2)
    with pytest.raises(ParamError) as e:
        EngineConfig.from_kwargs(xyzzy=1)
    assert e.value.param == "xyzzy" and "did you mean" not in str(e.value)


def test_vllm_spellings_are_aliases():
    config = EngineConfig.from_kwargs(gpu_memory_utilization=0.5)
    assert config.cache.memory_utilization == 0.5
    with pytest.raises(ParamError, match="twice"):
        EngineConfig.from_kwargs(gpu_memory_utilization=0.5, memory_utilization=0.4)


@pytest.mark.parametrize(
    "kwargs, param, text",
    [
        ({"block_size": 0}, "block_size", "block_size must be an integer in [1, 1024], got 0"),
        ({"dtype": "int4"}, "dtype", "dtype 'int4' is not supported"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching", "True or False"),
        ({"attention_transport": "tcp"}, "attention_transport", "one of distributed, in-process"),
        ({"attention_device": "cpu"}, "attention_device", "needs attention_nodes ≥ 1"),
        ({"quantize_all_linears": True}, "quantize_all_linears", "needs a quantization"),
        ({"tp_timeout_s": 0.5}, "tp_timeout_s", "a number in [1, 3600]"),
        ({"model": 3}, "model", "model must be a path, got int"),
    ],
)
def test_bad_values_name_their_option(kwargs, param, text):
    with pytest.raises(ParamError) as e:
        EngineConfig.from_kwargs(**kwargs)
    assert e.value.param == param
    assert text in str(e.value)


def test_resolved_configuration_travels_as_json_and_resolves_to_itself(llama_ckpt):
    path, _ = llama_ckpt
    config = EngineConfig.from_kwargs(model=str(path), block_size=8, arm="hadamard").resolve()
    assert config.model.dtype == "float32" and config.model.device == "cpu"
    assert config.model.max_model_len == 512  # the checkpoint's max_position_embeddings
    assert config.parallel.tensor_parallel_size == 1
    again = EngineConfig.from_json(config.to_json())
    assert again == config
    assert again.resolve() == config
    assert json.loads(config.to_json())["block_size"] == 8


def test_engine_takes_a_configuration_object(llama_ckpt):
    path, _ = llama_ckpt
    config = EngineConfig.from_kwargs(model=str(path), kv_cache_tokens=256, max_num_seqs=4)
    with LLM(config=config, block_size=8) as llm:
        resolved = llm.engine.engine_config
        assert resolved.cache.block_size == 8 and resolved.scheduler.max_num_seqs == 4
        assert llm.engine.blocks.num_blocks == 256 // 8


def test_docs_table_is_generated_from_the_declarations():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "tools" / "config_docs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.DOC.read_text()
    assert tool.render(text) == text, "docs/configuration.md is stale: python tools/config_docs.py"
    for f in ENGINE_OPTIONS:
        assert f"| `{f.name}` | `{f.flag}`" in text, f.name
    # The check can fail: a changed help line makes the file stale.
    assert tool.render(text.replace("tokens per KV block", "tokens per block")) != text.replace(
        "tokens per KV block", "tokens per block"
    )


def test_python_api_under_torchrun_is_a_standalone_engine_unless_told(llama_ckpt, monkeypatch):
    """A torchrun script that builds LLM() on every rank gets one engine per rank (data
    parallel); only the CLI reads the tensor-parallel size from WORLD_SIZE."""
    path, _ = llama_ckpt
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with LLM(str(path), device="cpu", kv_cache_tokens=64) as llm:
        assert llm.engine.engine_config.parallel.world_size == 1
        assert llm.engine.workers is None
    args = subparser("generate").parse_args([])
    from shardlm.engine_config import engine_kwargs

    assert engine_kwargs(args) == {"tensor_parallel_size": 2}
    with pytest.raises(ParamError, match="WORLD_SIZE 2 does not fit"):
        engine_kwargs(subparser("generate").parse_args(["--tp", "4"]))
