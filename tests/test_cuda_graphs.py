"""Decode steps from static buffers padded to batch-size buckets (runtime/cuda_graphs.py).

On CPU the buffers and padding run eagerly through Triton's interpreter (capture needs a
GPU): the tokens must equal the plain PyTorch path's (SHARDLM_KERNEL_DEVICE=cuda runs the
same on a GPU, compiled). The tests marked ``gpu`` capture real
CUDA graphs and skip without a GPU; run them on one with
``SHARDLM_KERNEL_DEVICE=cuda pytest tests/test_cuda_graphs.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("SHARDLM_KERNEL_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from shardlm import LLM, SamplingParams  # noqa: E402
from shardlm.runtime.cuda_graphs import DecodeGraphs, graph_buckets  # noqa: E402

PROMPTS = ["abc", "a longer prompt, past a few blocks", "x" * 21, "hello there", "q"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_buckets_cover_every_batch_up_to_the_largest():
    assert graph_buckets(1) == [1]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_buckets(1000)[-1] == 256  # past the last bucket, steps run eagerly


def generate(path, prompts, max_tokens=12, **kwargs) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(path, dtype="float32", device=DEVICE, block_size=4, **kwargs) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("variant,max_batch", [("llama-gqa", 8), ("mistral-sliding", 3)])
def test_static_decode_steps_give_the_plain_tokens(checkpoints, monkeypatch, variant, max_batch):
    """Five sequences of mixed lengths: decode-only steps of 5, 4, … sequences go through
    the static buffers, padded to buckets (5 → 8; with max_batch 3, 5 and 4 run eagerly and
    3 pads to 3); steps with prefill chunks run the plain way. Same tokens as PyTorch."""
    path, _ = checkpoints[variant]
    runs: list[tuple[int, int]] = []
    run = DecodeGraphs.run

    def counting_run(self, inputs):
        bucket = next(b for b in self.buckets if b >= inputs.num_decodes)
        runs.append((inputs.num_decodes, bucket))
        return run(self, inputs)

    monkeypatch.setattr(DecodeGraphs, "run", counting_run)
    real_init = LLM.__init__

    def init_with_graphs(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.engine.runner.init_decode_graphs(max_batch, capture=False)

    want = generate(path, PROMPTS, attention_backend="torch")
    monkeypatch.setattr(LLM, "__init__", init_with_graphs)
    got = generate(path, PROMPTS, attention_backend="triton", max_num_batched_tokens=16)
    assert got == want
    assert runs, "no step ran from the static buffers"
    assert max(n for n, _ in runs) <= max_batch
    assert any(bucket > n for n, bucket in runs) or max_batch == 3  # padding was exercised


def test_padding_rows_write_only_the_padding_slot(llama_ckpt):
    """A batch of 3 in the bucket of 4: the padding row's K/V lands in the padding slot,
    and every slot a sequence owns holds what the plain path wrote."""
    path, _ = llama_ckpt
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = PROMPTS[:3]
    with LLM(
        path, dtype="float32", device=DEVICE, block_size=4, attention_backend="torch"
    ) as plain:
        plain.runner.kv_cache.k.zero_()  # the pool is torch.empty: unwritten slots are garbage
        plain.generate(prompts, params, use_tqdm=False)
        want = plain.runner.kv_cache.k.clone()
    with LLM(path, dtype="float32", device=DEVICE, block_size=4, attention_backend="triton") as llm:
        llm.runner.init_decode_graphs(4, capture=False)
        cache = llm.runner.kv_cache
        cache.k.zero_()
        llm.generate(prompts, params, use_tqdm=False)
        assert cache.k[:, cache.padding_slot].abs().sum() > 0  # the padding row wrote here
    # The same schedule allocates the same blocks: every slot holds what the plain path
    # wrote there (zero where nothing was written), the padding slot excepted.
    torch.testing.assert_close(cache.k[:, : cache.padding_slot], want[:, : cache.padding_slot])


def test_engine_flags_are_checked(llama_ckpt):
    path, _ = llama_ckpt
    with pytest.raises(ValueError, match="enforce_eager must be True or False, got 'yes'"):
        LLM(path, device="cpu", enforce_eager="yes")
    with LLM(path, device="cpu") as llm:  # auto on CPU: the PyTorch path, no graphs
        assert llm.runner.attention_backend == "torch"
        assert llm.engine.engine_config.kernels.attention_backend == "auto"
        assert llm.runner.decode_graphs is None
        with pytest.raises(ValueError, match="decode graphs need attention_backend='triton'"):
            llm.runner.init_decode_graphs(4, capture=False)


def test_kernels_that_fail_at_start_up_fall_back_only_when_auto_chose_them(llama_ckpt, monkeypatch):
    """A kernel that cannot compile on this GPU must not take the default configuration
    down: "auto" falls back to PyTorch (same tokens), an explicit "triton" raises."""
    path, _ = llama_ckpt
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(path, dtype="float32", device=DEVICE, attention_backend="torch") as plain:
        want = plain.generate(PROMPTS[:2], params, use_tqdm=False)
    with LLM(path, dtype="float32", device=DEVICE, attention_backend="triton") as llm:
        runner = llm.runner
        runner.check_triton_kernels(fall_back=False)  # they run: nothing changes
        assert runner.attention_backend == "triton"

        def broken(*args, **kwargs):
            raise RuntimeError("PassManager::run failed")

        monkeypatch.setattr("shardlm.kernels.fused.rope_and_store", broken)
        with pytest.raises(RuntimeError, match="PassManager"):
            runner.check_triton_kernels(fall_back=False)
        runner.init_decode_graphs(4, capture=False)
        runner.check_triton_kernels(fall_back=True)
        assert runner.attention_backend == "torch"
        assert runner.decode_graphs is None  # they would run the Triton path
        assert not runner.attention.fuses_rope
        assert not runner.model.norm.use_kernel
        got = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_the_start_up_check_runs_the_split_merge_kernel_too(llama_ckpt, monkeypatch):
    """The check's table is as wide as a graph's, so the split decode and its merge kernel
    compile there (not first inside a capture, with no fallback around it)."""
    from shardlm.kernels import decode_attention

    path, _ = llama_ckpt
    split_kv_decode, _ = decode_attention._kernels()

    class BrokenMerge:
        def __getitem__(self, grid):
            raise RuntimeError("merge_splits: out of resources")

    with LLM(path, dtype="float32", device=DEVICE, attention_backend="triton") as llm:
        monkeypatch.setattr(decode_attention, "_kernels", lambda: (split_kv_decode, BrokenMerge()))
        with pytest.raises(RuntimeError, match="merge_splits"):
            llm.runner.check_triton_kernels(fall_back=False)


def test_graphs_out_of_memory_at_capture_leave_decode_eager(llama_ckpt, monkeypatch, caplog):
    path, _ = llama_ckpt

    def no_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    with LLM(path, dtype="float32", device=DEVICE, attention_backend="triton") as llm:
        monkeypatch.setattr(DecodeGraphs, "capture", no_memory)
        llm.runner.init_decode_graphs(4, capture=True)
        assert llm.runner.decode_graphs is None
        assert "out of GPU memory capturing decode graphs" in caplog.text
        monkeypatch.setattr(DecodeGraphs, "capture", broken)  # not a memory shortage: raised
        with pytest.raises(RuntimeError, match="stream is capturing"):
            llm.runner.init_decode_graphs(4, capture=True)


# -- on a GPU: real graphs --


@needs_gpu
@pytest.mark.parametrize("variant", ["llama-gqa", "mistral-sliding", "qwen2-bias"])
def test_gpu_graphs_give_the_eager_tokens_in_float32(checkpoints, variant):
    """Graphs + kernels against the eager PyTorch path, greedy, float32."""
    path, _ = checkpoints[variant]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def tokens(**kwargs) -> list[list[int]]:
        with LLM(path, dtype="float32", device="cuda", **kwargs) as llm:
            if kwargs.get("attention_backend") == "triton":
                assert llm.runner.decode_graphs is not None
                assert llm.runner.decode_graphs.graphs
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs]

    eager = tokens(attention_backend="torch", enforce_eager=True)
    assert tokens(attention_backend="triton") == eager


@needs_gpu
def test_gpu_graph_logits_match_eager_in_bfloat16(llama_ckpt):
    """The first decode step's logits, captured path against the eager PyTorch path, in
    bf16: equal within bf16 rounding of a few layers (the kernels round in other places).
    Later steps are left out: a near-tie can pick another token and change their input."""
    path, _ = llama_ckpt
    prompts = PROMPTS[:3]

    def decode_logits(**kwargs) -> torch.Tensor:
        with LLM(path, dtype="bfloat16", device="cuda", **kwargs) as llm:
            engine = llm.engine
            seen: list[torch.Tensor] = []
            run_step = engine.executor.run_step

            def keep(inputs):
                logits = run_step(inputs)
                if not inputs.prefill_tables:
                    seen.append(logits.clone())
                return logits

            engine.executor.run_step = keep
            params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            llm.generate(prompts, params, use_tqdm=False)
            return seen[0]

    want = decode_logits(attention_backend="torch", enforce_eager=True)
    got = decode_logits(attention_backend="triton")
    assert got.shape == want.shape
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.03 * scale


def test_speculative_verify_rows_run_from_the_static_buffers(checkpoints, monkeypatch):
    """A verify step (a sequence's token + its drafts as decode rows) is a decode-only step:
    it runs through the Triton decode kernel from the graphs' buffers, padded to a bucket;
    greedy tokens as plain PyTorch decoding without drafts."""
    path, _ = checkpoints["llama-gqa"]
    runs: list[int] = []
    run = DecodeGraphs.run

    def counting_run(self, inputs):
        runs.append(inputs.num_decodes)
        return run(self, inputs)

    monkeypatch.setattr(DecodeGraphs, "run", counting_run)
    real_init = LLM.__init__

    def init_with_graphs(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.engine.runner.init_decode_graphs(16, capture=DEVICE == "cuda")

    prompts = ["abcabcabcabcabc", "the cat, the cat, the cat", "x" * 21]
    want = generate(path, prompts, max_tokens=16, attention_backend="torch")
    monkeypatch.setattr(LLM, "__init__", init_with_graphs)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    got = generate(
        path, prompts, max_tokens=16, attention_backend="triton", speculative_config=spec
    )
    assert got == want
    assert any(n > len(prompts) for n in runs), "no verify step ran from the static buffers"
