"""Layer math against transformers' own functions and against the plain path."""

from __future__ import annotations

import pytest
import torch

from shardlm.config import RopeConfig, _parse_rope
from shardlm.layers.linear import Linear, choose_splits, split_k_matmul
from shardlm.layers.norm import rms_norm
from shardlm.layers.rotary import RotaryEmbedding, rope_attention_scale, rope_inv_freq


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
    ],
)
def test_inv_freq_matches_transformers(params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = 128
    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, rope_parameters=dict(params)
    )
    if params["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        ref = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    rope = _parse_rope({"rope_parameters": params, "max_position_embeddings": 8192}, "test")
    ours = rope_inv_freq(head_dim, rope)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    if params["rope_type"] != "default":
        assert rope_attention_scale(rope) == pytest.approx(ref_scale, rel=1e-12)
    if params["rope_type"] != "default":
        assert not torch.allclose(ours, rope_inv_freq(head_dim, RopeConfig(theta=rope.theta)))


def test_rotary_rotates_pairs_and_preserves_norm():
    rot = RotaryEmbedding(8, RopeConfig(), 64, torch.float32)
    x = torch.randn(5, 3, 8)
    pos = torch.tensor([0, 1, 7, 30, 63])
    y = rot(x, pos)
    torch.testing.assert_close(y[0], x[0])  # position 0 is the identity
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # Relative property: <R(p)q, R(p+d)k> depends only on d.
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    a = (rot(q, torch.tensor([3])) * rot(k, torch.tensor([8]))).sum()
    b = (rot(q, torch.tensor([20])) * rot(k, torch.tensor([25]))).sum()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
    x = (torch.randn(4, 16) * 3).to(dtype)
    torch.testing.assert_close(rms_norm(x, ref.weight, 1e-5), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("splits", [2, 4])
def test_split_k_matmul_equals_plain_product(t, splits):
    x = torch.randn(t, 64, dtype=torch.float64)
    w = torch.randn(64, 48, dtype=torch.float64)
    torch.testing.assert_close(split_k_matmul(x, w, splits), x @ w)
    # Non-contiguous input (e.g. a view of attention output) works too.
    xt = torch.randn(64, t, dtype=torch.float64).t()
    torch.testing.assert_close(split_k_matmul(xt, w, splits), xt @ w)


def test_linear_split_and_plain_paths_agree():
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight_t.normal_()
        lin.bias.normal_()
    x = torch.randn(3, 96)
    lin.splits = 3
    split = lin(x)
    lin.splits = 1
    plain = lin(x)
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, x @ lin.weight_t + lin.bias)


def test_choose_splits_divides_in_features():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert choose_splits(64, torch.device("cpu")) == 2
        assert choose_splits(63, torch.device("cpu")) == 1
        assert choose_splits(64, torch.device("meta")) == 1
    finally:
        torch.set_num_threads(threads)
