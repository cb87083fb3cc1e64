"""Half precision on CPU: Linear on oneDNN's packed weight (layers/linear.py), against the
plain product it replaces, layer by layer and through the whole engine."""

from __future__ import annotations

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.layers.linear import Linear, can_pack_for_cpu
from shardlm.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(
    not can_pack_for_cpu(torch.device("cpu"), torch.bfloat16),
    reason="this CPU's oneDNN has no bfloat16 linear",
)


@pytest.mark.parametrize("rows", [1, 3, 17, 300])
@pytest.mark.parametrize("shape", [(64, 96), (256, 4096), (2816, 1024)])
def test_packed_linear_is_the_plain_product(rows, shape):
    g = torch.Generator().manual_seed(rows)
    k, n = shape
    layer = Linear(k, n, bias=True)
    with torch.no_grad():
        layer.weight_t.copy_(torch.randn(k, n, generator=g) / k**0.5)
        layer.bias.copy_(torch.randn(n, generator=g))
    layer = layer.to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).bfloat16()
    want = x.float() @ layer.weight_t.float() + layer.bias.float()  # float32 reference
    plain = layer(x)
    assert layer.pack_for_cpu()
    assert layer.weight_t.numel() == 0  # the packed copy is the weight now
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # Both are bfloat16 products of the same numbers: within bfloat16 rounding of the
    # float32 result, and of each other.
    scale = want.abs().amax()
    assert (got.float() - want).abs().max() <= 2e-2 * scale
    assert (got.float() - plain.float()).abs().max() <= 2e-2 * scale


def test_float32_and_gpu_weights_are_not_packed():
    layer = Linear(64, 64)
    assert not layer.pack_for_cpu()
    assert layer.packed is None and layer.weight_t.numel() == 64 * 64


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-mha-tied", "qwen2-bias"])
def test_engine_logits_match_the_unpacked_model(variant, checkpoints, monkeypatch):
    """bfloat16 prompt logits with packed weights against the same engine with packing off:
    within bfloat16 rounding; the tied LM head keeps the plain weight its embedding reads."""
    path, _ = checkpoints[variant]
    ids = list(range(3, 40))
    with LLM(path, dtype="bfloat16", device="cpu") as llm:
        runner = llm.engine.runner
        assert runner.packed_layers > 0
        packed = llm.engine.prompt_logits(ids)
        tokens = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        weights = runner.weight_bytes
        streamed = runner.model.streamed_weight_bytes
    monkeypatch.setattr(LlamaForCausalLM, "pack_for_cpu", lambda self: 0)
    with LLM(path, dtype="bfloat16", device="cpu") as llm:
        plain = llm.engine.prompt_logits(ids)
        plain_weights = llm.engine.runner.weight_bytes
        plain_streamed = llm.engine.runner.model.streamed_weight_bytes
    tied = "tied" in variant
    assert (packed - plain).abs().max() <= 0.05 * plain.abs().max()
    assert (packed.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9
    assert len(tokens[0].outputs[0].token_ids) == 8
    head = llm.engine.config.vocab_size * llm.engine.config.hidden_size * 2
    assert weights == plain_weights + (head if tied else 0)  # a tied head is held twice
    assert streamed == plain_streamed  # but a step reads it once (the roofline's bytes)


@pytest.mark.parametrize("rows", [1, 4, 33])
@pytest.mark.parametrize("width", [256, 40])  # 40: no kernel (crashes torch 2.13's), the fallback
def test_int8_weight_only_linear_is_the_dequantized_product(rows, width):
    """W8A16: the int8 kernel against the product with the dequantized weight (float32)."""
    from shardlm.layers.quant import Int8WeightOnlyLinear

    g = torch.Generator().manual_seed(rows)
    layer = Linear(width, 384)
    with torch.no_grad():
        layer.weight_t.copy_(torch.randn(width, 384, generator=g) / 16)
    q = Int8WeightOnlyLinear(layer)
    assert q.kernel == (width % 16 == 0) and q.weight_q.dtype == torch.int8
    x = torch.randn(rows, width, generator=g)
    w = q.weight_q.float() * q.weight_scale.float()[:, None]  # what the int8 weight encodes
    want = x @ w.t()
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 384)
    # The kernel takes bfloat16 activations: within their rounding.
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    # And the int8 weight is close to the float one.
    assert (want - x @ layer.weight_t).abs().max() <= 3e-2 * want.abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_weight_only_engine_keeps_logits_and_shrinks_weights(dtype, checkpoints):
    path, _ = checkpoints["llama-gqa"]
    ids = list(range(3, 40))
    with LLM(path, dtype=dtype, device="cpu") as llm:
        want = llm.engine.prompt_logits(ids)
        dense = llm.engine.runner.model.streamed_weight_bytes
    with LLM(
        path,
        dtype=dtype,
        device="cpu",
        quantization="int8_weight_only",
        quantize_all_linears=True,
    ) as llm:
        model = llm.engine.runner.model
        assert type(model.lm_head).__name__ == "Int8WeightOnlyLinear"
        got = llm.engine.prompt_logits(ids)
        streamed = model.streamed_weight_bytes
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert streamed < dense / (3 if dtype == "float32" else 1.7)
