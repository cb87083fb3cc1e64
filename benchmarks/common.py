"""What the benchmarks share: the model-shape flags and a random checkpoint made with
transformers' save_pretrained (so both engines load the very same files)."""

from __future__ import annotations

import argparse
import time

import torch


def add_model_args(parser: argparse.ArgumentParser, vocab: bool = True) -> None:
    """Shape of the random Llama (default: ~58M parameters, the docs' CPU model)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    if vocab:
        parser.add_argument("--vocab", type=int, default=32000)


def make_checkpoint(
    path: str,
    args: argparse.Namespace,
    byte_vocab: bool = False,
    init_std: float | None = None,
    edit=None,
    max_positions: int = 2048,
) -> int:
    """Save a seeded random LlamaForCausalLM of that shape to ``path``; return its size.

    ``byte_vocab``: shardlm's byte-level tokenizer and its 258-entry vocabulary (so text
    prompts work) instead of ``args.vocab``. ``init_std``: weights drawn with this std instead
    of transformers' 0.02 (which leaves a random model's logits nearly uniform). ``edit``:
    called with the model and the seeded generator (after the init) before it is saved.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardlm.byte_tokenizer import BYTE_VOCAB_SIZE, build_byte_level_tokenizer

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=BYTE_VOCAB_SIZE if byte_vocab else args.vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **({"bos_token_id": 0, "eos_token_id": 1} if byte_vocab else {}),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std, generator=g)
    if edit is not None:
        edit(model, g)
    model.save_pretrained(path)
    if byte_vocab:
        build_byte_level_tokenizer(path)
    return sum(p.numel() for p in model.parameters())


def print_profile(fn, top: int = 8) -> None:
    """Run ``fn`` once under the torch profiler; print where shardlm's time goes."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profile of one shardlm run: {total / 1e6:.2f} s of op time, top {top} ops")
    for e in events[:top]:
        share = 100 * e.self_cpu_time_total / total
        print(f"  {e.key:<52}{share:>6.1f}%{e.count:>9} calls")


def per_call_us(fn, calls: int = 300) -> float:
    """Microseconds per call of ``fn`` after 10 warm-up calls."""
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6
