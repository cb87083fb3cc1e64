"""Tensor parallelism (figure 1) on CPU/gloo: same tokens as one process and as transformers,
1/N of the weights per rank, clean shutdown, and failures that surface instead of hanging."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.errors import ConfigError, WorkerFailure
from tests.conftest import make_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
TP_VARIANTS = {
    "llama-gqa-8q-2kv": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "llama-mqa": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 1}),
    "qwen2-bias": ("qwen2", {"num_attention_heads": 8, "num_key_value_heads": 4}),
    "llama-tied": (
        "llama",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": True},
    ),
}


def child_pids() -> set[int]:
    """Live (non-zombie) processes whose parent is this test process."""
    me = os.getpid()
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z" and not resource_tracker(entry):
            pids.add(int(entry.name))
    return pids


def resource_tracker(proc: Path) -> bool:
    """multiprocessing's resource tracker, started by the first spawn-context queue of this
    process (a test's EngineClient) and alive as long as the process by design: no leak."""
    try:
        return b"multiprocessing.resource_tracker" in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory):
    out = {}
    for name, (arch, overrides) in TP_VARIANTS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_checkpoint(path, arch, overrides, seed=11))
    return out


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 258, (n,), generator=g).tolist() for n in (40, 9)]


@pytest.mark.parametrize("variant", list(TP_VARIANTS))
def test_tp_matches_single_process_and_transformers(variant, tp_checkpoints):
    from tests.test_model_parity import hf_greedy

    path, hf = tp_checkpoints[variant]
    batch = prompts()
    with LLM(path, device="cpu") as one:
        ref_tokens = [o.outputs[0].token_ids for o in one.generate(batch, GREEDY, use_tqdm=False)]
        ref_logits = one.prompt_logits(batch[0])
    assert ref_tokens[0] == hf_greedy(hf, batch[0], 64)
    for n in (2, 4):
        with LLM(path, device="cpu", tensor_parallel_size=n) as llm:
            outs = llm.generate(batch, GREEDY, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == ref_tokens, f"TP={n}"
            logits = llm.prompt_logits(batch[0])
            rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
            assert rel < 1e-4, f"TP={n}: relative logit error {rel:.2e}"
    assert not child_pids()


def test_tp_continuous_batching_with_preemption_matches(tp_checkpoints):
    import random

    path, _ = tp_checkpoints["llama-gqa-8q-2kv"]
    rng = random.Random(3)
    batch = [[rng.randrange(2, 258) for _ in range(rng.randint(5, 120))] for _ in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with LLM(path, device="cpu", kv_cache_tokens=4096) as one:
        expected = [o.outputs[0].token_ids for o in one.generate(batch, params, use_tqdm=False)]
    with LLM(
        path,
        device="cpu",
        tensor_parallel_size=2,
        kv_cache_tokens=256,
        max_num_batched_tokens=64,
    ) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        assert llm.engine.stats.preemptions > 0
        assert llm.engine.stats.blocks_in_use == 0
    assert got == expected


def test_per_rank_weights_are_a_shard(tp_checkpoints):
    path, _ = tp_checkpoints["llama-gqa-8q-2kv"]
    with LLM(path, device="cpu") as one:
        (total,) = one.engine.rank_weight_bytes
        c = one.config
    h, d, layers = c.hidden_size, c.head_dim, c.num_hidden_layers
    norms = (2 * layers + 1) * h * 4  # replicated on every rank
    for n in (2, 4):
        with LLM(path, device="cpu", tensor_parallel_size=n) as llm:
            per_rank = llm.engine.rank_weight_bytes
        assert len(per_rank) == n and len(set(per_rank)) == 1
        # Expected from the shapes: every matrix split n ways; the vocabulary padded up to a
        # multiple of n; KV heads replicated when there are fewer than ranks.
        kv_local = max(1, c.num_key_value_heads // n)
        q_local = c.num_attention_heads // n
        per_layer = h * (q_local + 2 * kv_local) * d + q_local * d * h
        per_layer += 3 * h * c.intermediate_size // n
        vocab = -(-c.vocab_size // n) * h * 2  # embedding + head
        expected = (layers * per_layer + vocab) * 4 + norms
        assert per_rank[0] == expected, (n, per_rank, expected)
        kv_extra = layers * 2 * h * d * (kv_local * n - c.num_key_value_heads) * 4 / n
        assert per_rank[0] <= total / n + norms + kv_extra + 2 * h * 4 * n


def test_one_tensor_parallel_engine_per_process(tp_checkpoints):
    path, _ = tp_checkpoints["llama-mqa"]
    with (
        LLM(path, device="cpu", tensor_parallel_size=2),
        pytest.raises(ValueError, match="already running in this process"),
    ):
        LLM(path, device="cpu", tensor_parallel_size=2)
    with LLM(path, device="cpu", tensor_parallel_size=2):  # fine once the first is shut down
        pass
    assert not child_pids()


def test_indivisible_model_is_refused_before_anything_starts(tp_checkpoints):
    path, _ = tp_checkpoints["llama-gqa-8q-2kv"]
    before = child_pids()
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide the model"):
        LLM(path, device="cpu", tensor_parallel_size=3)
    assert child_pids() == before


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_worker_failure_is_reported_by_rank_and_nothing_is_left(how, tp_checkpoints):
    path, _ = tp_checkpoints["llama-gqa-8q-2kv"]
    timeout = 5.0
    llm = LLM(path, device="cpu", tensor_parallel_size=2, tp_timeout_s=timeout)
    worker = llm.engine.workers.processes[0]
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)

    def strike() -> None:
        time.sleep(0.5)
        os.kill(worker.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)

    threading.Thread(target=strike).start()
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as e:
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    elapsed = time.monotonic() - start
    message = str(e.value)
    assert "rank 1" in message
    assert ("died" in message) if how == "kill" else ("stopped answering" in message)
    assert elapsed < 0.5 + timeout + 10
    llm.shutdown()
    assert worker.poll() is not None
    assert not child_pids()
    with pytest.raises(WorkerFailure):  # the engine stays failed, it does not hang
        llm.generate([[5]], SamplingParams(max_tokens=1), use_tqdm=False)


def cli_generate(
    path: Path,
    launcher: list[str],
    extra: list[str] = (),
    env: dict | None = None,
    prefix: list[str] = (),
) -> subprocess.Popen:
    """Start ``shardlm generate`` (greedy, 24 tokens) under a launcher; caller collects it."""
    command = [
        *prefix, *launcher, "generate", "--model", str(path), "--prompt", "hello",
        "--max-tokens", "24", "--temperature", "0", "--ignore-eos", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out


SHARDLM = [sys.executable, "-m", "shardlm"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_cli_tp_and_torchrun_give_the_same_text(tp_checkpoints):
    path, _ = tp_checkpoints["llama-gqa-8q-2kv"]
    single = finish(cli_generate(path, SHARDLM))
    assert single.startswith("hello") and len(single) > len("hello\n")
    # Two TP=2 jobs at once on this host: each rendezvous on its own OS-chosen port.
    jobs = [cli_generate(path, SHARDLM, ["--tp", "2"]) for _ in range(2)]
    assert [finish(j) for j in jobs] == [single, single]
    torchrun = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "shardlm"]
    assert finish(cli_generate(path, torchrun)) == single


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: two "hosts" on this machine."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    a, b = f"shl-a{tag}", f"shl-b{tag}"
    va, vb = f"vsa{tag}", f"vsb{tag}"
    steps = [
        ["ip", "netns", "add", a],
        ["ip", "netns", "add", b],
        ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
        ["ip", "link", "set", va, "netns", a],
        ["ip", "link", "set", vb, "netns", b],
        ["ip", "-n", a, "addr", "add", "10.231.7.1/24", "dev", va],
        ["ip", "-n", b, "addr", "add", "10.231.7.2/24", "dev", vb],
        ["ip", "-n", a, "link", "set", va, "up"],
        ["ip", "-n", b, "link", "set", vb, "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"],
        ["ip", "-n", b, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                pytest.skip(f"network namespaces not permitted here: {r.stderr.strip()}")
        yield (a, va, "10.231.7.1"), (b, vb, "10.231.7.2")
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_torchrun_across_two_hosts(tp_checkpoints, two_hosts):
    path, _ = tp_checkpoints["llama-gqa-8q-2kv"]
    single = finish(cli_generate(path, SHARDLM))
    (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) = two_hosts
    rdzv = [
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{addr_a}:29531", "--rdzv-id", "shardlm-test",
    ]  # fmt: skip
    # Both namespaces share this machine's hostname, so each host names its own address
    # (--local-addr) and host A is told it serves the rendezvous store.
    hosts = ((ns_a, if_a, addr_a, "true"), (ns_b, if_b, addr_b, "false"))
    procs = []
    for ns, ifname, addr, is_host in hosts:
        host_args = ["--rdzv-conf", f"is_host={is_host}", "--local-addr", addr]
        launcher = [*TORCHRUN, *rdzv, *host_args, "-m", "shardlm"]
        env = {"GLOO_SOCKET_IFNAME": ifname}
        procs.append(cli_generate(path, launcher, env=env, prefix=["ip", "netns", "exec", ns]))
    outputs = [finish(p) for p in procs]
    # Whichever host the rendezvous made rank 0 prints the text; the other prints nothing.
    assert sorted(outputs) == ["", single]


def test_workers_exit_when_the_driver_is_killed(tp_checkpoints):
    """A driver killed with SIGKILL cannot clean up: its workers must notice and exit."""
    path, _ = tp_checkpoints["llama-mqa"]
    script = (
        "import sys, time\n"
        "from shardlm import LLM\n"
        f"llm = LLM({str(path)!r}, device='cpu', tensor_parallel_size=2)\n"
        "print(llm.engine.workers.processes[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(driver.stdout.readline())
        driver.kill()
        driver.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and is_alive(worker_pid):
            time.sleep(0.2)
        assert not is_alive(worker_pid), "the worker outlived its driver"
    finally:
        driver.kill()


def test_startup_error_keeps_its_message_under_tp(tp_checkpoints):
    path, _ = tp_checkpoints["llama-mqa"]
    with pytest.raises(ValueError, match="less than one block"):
        LLM(path, device="cpu", tensor_parallel_size=2, memory_utilization=1e-12)
    assert not child_pids()
