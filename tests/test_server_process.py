"""run_server as a process, called directly (not through the CLI): the one line it prints when
listening (with port 0, the port the system chose), the access log, the served name, the API
key from $SHARDLM_API_KEY, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_checkpoint

LISTENING = re.compile(
    r"^shardlm serve: listening on http://127\.0\.0\.1:(\d+) \(model (.+), dtype float32, "
    r"device cpu, max_model_len 256\)$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-process")
    make_checkpoint(path, "llama", {"max_position_embeddings": 256})
    return path


class Served:
    """``run_server(engine_args, ServerConfig(port=0, ...), access_log)`` in a subprocess;
    stderr goes to a file (a pipe nobody reads could fill and block the server)."""

    def __init__(self, ckpt: Path, access_log: bool, env: dict[str, str], **server) -> None:
        engine_args = {"model": str(ckpt), "device": "cpu", "dtype": "float32"}
        engine_args["kv_cache_tokens"] = 1024
        code = (
            "import sys\n"
            "from shardlm.entrypoints.openai.server import run_server\n"
            "from shardlm.entrypoints.openai.server_config import ServerConfig\n"
            f"config = ServerConfig(port=0, **{server!r})\n"
            f"sys.exit(run_server({engine_args!r}, config, access_log={access_log!r}))\n"
        )
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k != "SHARDLM_API_KEY"} | env
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=self.log, stderr=self.log, env=env
        )
        deadline = time.monotonic() + 120
        while not (found := LISTENING.search(self.text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"no listening line: {self.text()}")
            time.sleep(0.1)
        self.port, self.model = int(found.group(1)), found.group(2)
        self.url = f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def test_run_server_says_where_it_listens_logs_access_and_reads_the_key_from_env(ckpt):
    s = Served(ckpt, access_log=True, env={"SHARDLM_API_KEY": "env-key"})
    try:
        assert s.port != 0 and s.model == str(ckpt)  # no served name: the model path
        assert httpx.get(f"{s.url}/v1/models", timeout=10).status_code == 401
        auth = {"Authorization": "Bearer env-key"}
        models = httpx.get(f"{s.url}/v1/models", headers=auth, timeout=10).json()
        assert [m["id"] for m in models["data"]] == [str(ckpt)]
        body = {"prompt": "ab", "max_tokens": 3}
        r = httpx.post(f"{s.url}/v1/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert s.stop() == 0
    log = s.text()
    assert len(LISTENING.findall(log)) == 1
    assert re.search(r'"GET /v1/models HTTP/1\.1" 401', log), log
    assert re.search(r'"POST /v1/completions HTTP/1\.1" 200', log), log


def test_run_server_without_access_log_is_quiet_and_uses_the_served_name(ckpt):
    s = Served(ckpt, access_log=False, env={}, served_model_name="named")
    try:
        assert s.model == "named"
        models = httpx.get(f"{s.url}/v1/models", timeout=10).json()  # no key: none needed
        assert [m["id"] for m in models["data"]] == ["named"]
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x", "model": "named"})
        assert r.status_code == 200
    finally:
        assert s.stop() == 0
    log = s.text()
    assert "HTTP/1.1" not in log, log
    assert log.strip().splitlines() == [LISTENING.search(log).group(0)], log
