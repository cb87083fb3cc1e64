"""`shardlm serve` runs its engine in a process of its own (engine_core.py): the HTTP process
keeps answering when the engine process dies (503s, every open request failed explicitly),
the engine process exits when the HTTP process is killed, and start-up errors raised in the
engine process reach the command line as one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from shardlm import LLM
from tests.conftest import make_checkpoint
from tests.test_server import Server, free_port, greedy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-engine-process")
    make_checkpoint(path, "llama", {"max_position_embeddings": 4096})
    return path


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def engine_pid(server_pid: int) -> int:
    """The server's engine process: its spawned child (not multiprocessing's resource
    tracker)."""
    found = [
        c
        for c in children(server_pid)
        if "spawn_main" in command_line(c) and "resource_tracker" not in command_line(c)
    ]
    assert len(found) == 1, [command_line(c) for c in children(server_pid)]
    return found[0]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"  # a zombie is gone too


def test_a_killed_engine_process_fails_open_requests_and_health_says_503(ckpt):
    s = Server(ckpt, api_key=None)
    try:
        engine = engine_pid(s.proc.pid)
        body = {"prompt": "abc", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # it is generating
            os.kill(engine, signal.SIGKILL)
            events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert error["type"] == "service_unavailable"
        assert "engine process exited" in error["message"], error
        # The HTTP process stays up and says the engine is gone, on every route that needs it.
        health = httpx.get(f"{s.url}/health", timeout=10)
        assert health.status_code == 503 and "engine process exited" in health.text
        plain = {"prompt": "abc", "max_tokens": 4}
        r = httpx.post(f"{s.url}/v1/completions", json=plain, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(f"{s.url}/v1/chat/completions", json=chat, timeout=10).status_code == 503
    finally:
        assert s.stop() == 0  # a requested stop is still a clean exit


def test_the_engine_process_exits_when_the_server_is_killed(ckpt):
    s = Server(ckpt, api_key=None)
    engine = engine_pid(s.proc.pid)
    s.proc.kill()
    s.proc.wait()
    deadline = time.monotonic() + 20
    while alive(engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    s.log.close()
    assert not alive(engine)


def test_sigint_to_the_process_group_stops_both_processes_cleanly(ckpt):
    """Ctrl-C in a terminal (or a service manager's SIGTERM) signals every process of the
    group: the engine process ignores it and the HTTP process shuts it down after draining."""
    s = Server(ckpt, api_key=None)
    engine = engine_pid(s.proc.pid)
    os.kill(engine, signal.SIGINT)  # what the terminal sends the engine: ignored
    os.kill(engine, signal.SIGTERM)  # what a service manager sends the group: ignored too
    time.sleep(0.5)
    assert alive(engine)
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(timeout=30) == 130  # drained, then exits as interrupted commands do
    s.log.close()
    deadline = time.monotonic() + 10
    while alive(engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(engine)


def test_a_start_up_error_in_the_engine_process_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    argv = [sys.executable, "-m", "shardlm", "serve", "--model", str(tmp_path), "--port", "0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("shardlm: error: ")]
    assert len(errors) == 1 and "GPT2LMHeadModel" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_serve_under_torchrun_runs_the_engine_as_rank_0(ckpt):
    """torchrun starts `shardlm serve` on every rank; rank 0's process serves HTTP and its
    engine process (which inherits RANK=0) drives rank 1: the same text as one process."""
    with LLM(ckpt, dtype="float32", device="cpu", kv_cache_tokens=4096) as llm:
        expected = greedy(llm, "The cat")
    port = free_port()
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    argv += ["2", "-m", "shardlm", "serve", "--model", str(ckpt), "--tp", "2", "--port"]
    argv += [str(port), "--device", "cpu", "--dtype", "float32", "--kv-cache-tokens", "4096"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            body = {"prompt": "The cat", "temperature": 0, "max_tokens": 12, "ignore_eos": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            log.seek(0)
            assert r.json()["choices"][0]["text"] == expected, log.read()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_failure_after_the_engine_started_does_not_leave_the_server_waiting(ckpt):
    """Whatever fails between starting the engine process and serving, the HTTP process
    stops its engine and exits (a non-daemon child would keep it waiting forever)."""
    code = (
        "import sys\n"
        "from shardlm.entrypoints.openai import server\n"
        "from shardlm.entrypoints.openai.server_config import ServerConfig\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('app failed')\n"
        "server.build_app = broken\n"
        "try:\n"
        f"    args = {{'model': {str(ckpt)!r}, 'device': 'cpu'}}\n"
        "    server.run_server(args, ServerConfig(port=0))\n"
        "except RuntimeError as e:\n"
        "    print('raised', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "raised app failed" in r.stdout, r.stderr
