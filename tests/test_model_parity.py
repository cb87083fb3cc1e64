"""shardlm vs transformers on tiny random checkpoints: logits and greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from shardlm import LLM, SamplingParams
from tests.conftest import VARIANTS

PROMPT_LEN = 40


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (PROMPT_LEN, 7, 1, 23)]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate, never stopping at EOS (like ignore_eos=True).

    min_new_tokens would not do: it forbids EOS, where ignore_eos lets EOS be generated.
    """
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # only the model's own default config can drop EOS
    config.pad_token_id = 0
    saved, model.generation_config = model.generation_config, config
    try:
        with torch.no_grad():
            x = torch.tensor([ids])
            # An explicit mask: else HF masks out prompt tokens equal to pad_token_id.
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
            )
    finally:
        model.generation_config = saved
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def llms(checkpoints):
    loaded = {
        name: LLM(path, dtype="float32", device="cpu") for name, (path, _) in checkpoints.items()
    }
    yield loaded
    for llm in loaded.values():
        llm.shutdown()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_logits_match_transformers(variant, checkpoints, llms):
    _, hf = checkpoints[variant]
    llm = llms[variant]
    ids = prompts(llm.config.vocab_size)[0]
    ours = llm.prompt_logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{variant}: max relative logit error {rel:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_64_greedy_tokens_match_transformers(variant, checkpoints, llms):
    _, hf = checkpoints[variant]
    llm = llms[variant]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    batch = prompts(llm.config.vocab_size)
    outs = llm.generate(batch, params)
    for ids, out in zip(batch, outs, strict=True):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 64)
        assert out.outputs[0].finish_reason == "length"


def test_text_prompt_uses_tokenizer_and_matches(checkpoints, llms):
    from transformers import AutoTokenizer

    path, hf = checkpoints["llama-gqa"]
    tok = AutoTokenizer.from_pretrained(path)
    text = "def fib(n): 🙂 héllo"
    out = llms["llama-gqa"].generate(
        text, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    )[0]
    assert out.prompt == text
    assert out.prompt_token_ids == tok(text)["input_ids"]
    expected = hf_greedy(hf, out.prompt_token_ids, 16)
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == tok.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize(
    "variant,plain_overrides",
    [
        ("llama-rope-linear", {}),
        ("llama-rope-llama3", {}),
        ("qwen2-rope-yarn", {}),
        ("mistral-sliding", {"sliding_window": None}),
        ("qwen2-sliding", {"use_sliding_window": False}),
    ],
)
def test_variant_features_change_the_output(variant, plain_overrides, checkpoints, llms, tmp_path):
    """Guard against a config flag being silently ignored: dropping it must change logits."""
    from tests.conftest import make_checkpoint

    arch, overrides = VARIANTS[variant]
    plain = {k: v for k, v in overrides.items() if k != "rope_scaling"} | plain_overrides
    make_checkpoint(tmp_path, arch, plain)
    ids = prompts(llms[variant].config.vocab_size)[0]
    with LLM(tmp_path, device="cpu") as other:
        a = other.prompt_logits(ids)
    b = llms[variant].prompt_logits(ids)
    assert (a - b).abs().max() > 1e-3


def test_sharded_index_checkpoint_loads_identically(tmp_path, llms, checkpoints):
    from tests.conftest import make_checkpoint

    make_checkpoint(tmp_path, "llama", {}, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = prompts(258)[1]
    with LLM(tmp_path, device="cpu") as sharded:
        a = sharded.prompt_logits(ids)
    b = llms["llama-gqa"].prompt_logits(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_half_precision_dtypes_load_and_stay_close(dtype, torch_dtype, llama_ckpt, llms):
    path, _ = llama_ckpt
    ids = prompts(258)[0]
    with LLM(path, dtype=dtype, device="cpu") as llm:
        assert all(p.dtype == torch_dtype for p in llm.runner.model.parameters())
        low = llm.prompt_logits(ids)
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
    ref = llms["llama-gqa"].prompt_logits(ids)
    rel = ((low - ref).abs().max() / ref.abs().max()).item()
    assert rel < 5e-2


def test_auto_dtype_is_float32_on_cpu(llama_ckpt):
    path, _ = llama_ckpt
    with LLM(path, device="cpu") as llm:
        assert llm.engine.dtype == torch.float32
