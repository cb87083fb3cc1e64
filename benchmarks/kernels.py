"""The Triton kernels one by one against the PyTorch code they replace, on the decode shapes
of the Llama-1B and 8B benchmarks: µs per call and, for decode attention, the bandwidth its
K/V reads reach against the device's copy bandwidth (measured in the same run).

    python3 benchmarks/kernels.py                 # on a GPU (triton.testing.do_bench, median)
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/kernels.py --smoke   # CPU: runs, no timing

Decode attention's peer is PagedAttention's PyTorch path (keys gathered through the slots,
one SDPA call); the fused kernels' peers are layers/norm.py, activation.py and rotary.py plus
the two ``index_copy_`` cache writes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shardlm.config import RopeConfig
from shardlm.entrypoints.bench import copy_bandwidth
from shardlm.kernels.decode_attention import paged_decode_attention
from shardlm.kernels.fused import add_rms_norm, rope_and_store, silu_and_mul
from shardlm.layers.activation import silu_and_mul as torch_silu_and_mul
from shardlm.layers.norm import rms_norm
from shardlm.layers.rotary import RotaryEmbedding

# (name, batch, query heads, KV heads, head dim, context)
ATTENTION = [
    ("1B bs1", 1, 32, 8, 64, 256),
    ("1B bs64", 64, 32, 8, 64, 192),
    ("8B bs1", 1, 32, 8, 128, 256),
    ("8B bs64", 64, 32, 8, 128, 192),
    ("8B bs1 32k", 1, 32, 8, 128, 32768),
]
# (name, tokens, hidden, intermediate, query heads, KV heads, head dim)
LAYERS = [
    ("1B T=1", 1, 2048, 8192, 32, 8, 64),
    ("1B T=64", 64, 2048, 8192, 32, 8, 64),
    ("8B T=1", 1, 4096, 14336, 32, 8, 128),
    ("8B T=64", 64, 4096, 14336, 32, 8, 128),
]
SMOKE_ATTENTION = [("smoke", 2, 4, 2, 16, 40)]
SMOKE_LAYERS = [("smoke", 2, 64, 96, 4, 2, 16)]


def timer(device: torch.device, smoke: bool) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda" and not smoke:
        from triton.testing import do_bench

        return lambda fn: 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)

    return cpu_time


def attention_rows(device, dtype, time_us, shapes, bandwidth) -> None:
    print(
        f"{'decode attention':<18}{'triton µs':>10}{'torch µs':>10}{'speed-up':>9}"
        f"{'KV GB/s':>9}{'% copy bw':>10}"
    )
    for shape in shapes:
        attention_row(device, dtype, time_us, shape, bandwidth)


def attention_row(device, dtype, time_us, shape, bandwidth, block: int = 16) -> None:
    name, b, hq, hkv, d, ctx = shape
    blocks = -(-ctx // block)
    k_pool = torch.randn(b * blocks * block + 1, hkv, d, device=device, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    tables = torch.randperm(b * blocks, device=device).view(b, blocks)
    lens = torch.full((b,), ctx, device=device)
    q = torch.randn(b, hq, d, device=device, dtype=dtype)
    scale = d**-0.5
    pos = torch.arange(ctx, device=device)
    key_slots = tables[:, pos // block] * block + pos % block  # [B, ctx]

    def triton_call():
        return paged_decode_attention(q, k_pool, v_pool, tables, lens, block, scale)[0]

    def torch_call():
        keys = k_pool[key_slots].transpose(1, 2)
        vals = v_pool[key_slots].transpose(1, 2)
        return F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, vals, scale=scale, enable_gqa=True
        ).squeeze(2)

    torch.testing.assert_close(triton_call(), torch_call(), rtol=2e-2, atol=2e-2)
    t, r = time_us(triton_call), time_us(torch_call)
    gbs = 2 * b * ctx * hkv * d * dtype.itemsize / (t * 1e-6) / 1e9
    share = 100 * gbs * 1e9 / bandwidth
    print(f"{name:<18}{t:10.1f}{r:10.1f}{r / t:8.2f}×{gbs:9.0f}{share:9.0f}%")


def layer_rows(device, dtype, time_us, shapes) -> None:
    print(f"\n{'fused kernel':<24}{'triton µs':>10}{'torch µs':>10}{'speed-up':>9}")
    for shape in shapes:
        for what, fused, plain in layer_cases(device, dtype, shape):
            tt, pt = time_us(fused), time_us(plain)
            print(f"{shape[0] + ' ' + what:<24}{tt:10.1f}{pt:10.1f}{pt / tt:8.2f}×")


def layer_cases(device, dtype, shape) -> list[tuple[str, Callable, Callable]]:
    """(name, fused call, PyTorch call) for one shape's three fused kernels."""
    _, t, h, inter, hq, hkv, d = shape
    x = torch.randn(t, h, device=device, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(h, device=device, dtype=dtype)
    gate_up = torch.randn(t, 2 * inter, device=device, dtype=dtype)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device, dtype=dtype)
    rotary = RotaryEmbedding(d, RopeConfig(theta=500000.0), 4096, dtype).to(device)
    positions = torch.randint(0, 4096, (t,), device=device)
    slots = torch.randperm(4 * t, device=device)[:t]
    k_pool = torch.zeros(4 * t, hkv, d, device=device, dtype=dtype)
    v_pool = torch.zeros_like(k_pool)

    def torch_rope():
        qk = rotary(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), positions)
        k_pool.index_copy_(0, slots, qk[:, hq:])
        v_pool.index_copy_(0, slots, qkv[:, (hq + hkv) * d :].view(t, hkv, d))
        return qk[:, :hq]

    def fused_rope():
        args = (qkv, positions, rotary.cos, rotary.sin, slots, k_pool, v_pool, hq, hkv)
        return rope_and_store(*args)

    return [
        (
            "add + RMSNorm",
            lambda: add_rms_norm(x, res, w, 1e-5),
            lambda: rms_norm(x + res, w, 1e-5),
        ),
        ("SiLU·mul", lambda: silu_and_mul(gate_up), lambda: torch_silu_and_mul(gate_up)),
        ("RoPE + KV write", fused_rope, torch_rope),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no timing (CPU)")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        dtype = torch.float32 if args.dtype == "bfloat16" else dtype  # numpy has no bfloat16
    time_us = timer(device, args.smoke)
    bandwidth = copy_bandwidth(device)  # the figure `shardlm bench`'s roofline uses
    print(f"{device}, {dtype}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    attention_rows(device, dtype, time_us, SMOKE_ATTENTION if args.smoke else ATTENTION, bandwidth)
    layer_rows(device, dtype, time_us, SMOKE_LAYERS if args.smoke else LAYERS)


if __name__ == "__main__":
    main()
