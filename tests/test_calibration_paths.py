"""Where `shardlm calibrate` writes and where `arm="smooth"|"both"` and `inspect` read: never
inside the installed package (the built-in model's calibration goes to a per-user directory),
and the per-user file, when there is one, is the one read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shardlm import calibration
from shardlm.calibration import (
    CALIBRATION_FILE,
    PACKAGE_DIR,
    calibration_out_path,
    find_calibration,
    user_cache_dir,
    user_calibration_path,
    writable_beside,
)
from shardlm.demo import BUILTIN_DIR, demo_checkpoint
from shardlm.entrypoints.cli import main as cli_main
from shardlm.errors import ConfigError
from shardlm.models import transforms
from shardlm.models.transforms import WeightTransforms
from tests.conftest import make_checkpoint

SHIPPED = BUILTIN_DIR / CALIBRATION_FILE
CHEAP = ["--samples", "2", "--seq-len", "32", "--device", "cpu"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A per-user directory of the test's own: the real one is never read or written."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SHARDLM_CACHE_DIR", str(path))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    text = tmp_path / "calibration.py"
    text.write_text(Path(__file__).read_text())  # some Python, which tiny-code knows
    return text


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    make_checkpoint(path, "llama")
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_user_cache_dir_follows_the_environment(monkeypatch, tmp_path, cache_dir):
    assert user_cache_dir() == cache_dir
    monkeypatch.delenv("SHARDLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "shardlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "shardlm"


def test_user_calibration_path_is_per_resolved_checkpoint(tmp_path, monkeypatch, cache_dir):
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    path = user_calibration_path(a)
    assert path.name == CALIBRATION_FILE
    assert path.parent.parent == cache_dir / "calibration"
    assert path.parent.name.startswith("model-")
    assert user_calibration_path(b) != path  # same name, another checkpoint
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert user_calibration_path("model") == path  # a relative path is the same checkpoint


def test_builtin_model_is_never_written_beside():
    assert not writable_beside(BUILTIN_DIR)
    assert calibration_out_path(BUILTIN_DIR) == user_calibration_path(BUILTIN_DIR)


def test_a_writable_checkpoint_is_calibrated_beside_unless_a_user_file_exists(ckpt):
    assert calibration_out_path(ckpt) == ckpt / CALIBRATION_FILE
    user = user_calibration_path(ckpt)
    user.parent.mkdir(parents=True)
    user.write_bytes(b"")
    # The per-user file is read first, so a new calibration must replace it to be used.
    assert calibration_out_path(ckpt) == user


def test_a_read_only_checkpoint_is_calibrated_in_the_user_dir(ckpt, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ckpt and real_access(p, mode))
    assert not writable_beside(ckpt)
    assert calibration_out_path(ckpt) == user_calibration_path(ckpt)


def test_lookup_prefers_the_user_calibration(ckpt):
    with pytest.raises(ConfigError) as e:
        WeightTransforms.resolve(ckpt, "smooth", None, None, False)
    # Both places looked at are named, with the command to run.
    assert str(ckpt / CALIBRATION_FILE) in str(e.value)
    assert str(user_calibration_path(ckpt)) in str(e.value)
    assert "run `shardlm calibrate --model" in str(e.value)
    (ckpt / CALIBRATION_FILE).write_bytes(b"")
    assert find_calibration(ckpt) == ckpt / CALIBRATION_FILE
    user = user_calibration_path(ckpt)
    user.parent.mkdir(parents=True)
    user.write_bytes(b"")
    assert find_calibration(ckpt) == user
    assert WeightTransforms.resolve(ckpt, "both", None, None, False).calibration == str(user)
    given = ckpt / "other.safetensors"
    given.write_bytes(b"")
    assert WeightTransforms.resolve(ckpt, "smooth", given, None, False).calibration == str(given)


def test_builtin_model_finds_its_shipped_calibration_without_a_user_one():
    resolved = WeightTransforms.resolve(demo_checkpoint(), "smooth", None, None, False)
    assert resolved.calibration == str(SHIPPED)


def test_calibrate_without_model_writes_the_user_dir_and_smooth_reads_it(data, capsys, monkeypatch):
    shipped = digest(SHIPPED)
    assert cli_main(["calibrate", "--data", str(data), *CHEAP]) == 0
    captured = capsys.readouterr()
    assert "tiny-code" in captured.err  # the built-in model's notice, as generate prints it
    user = user_calibration_path(BUILTIN_DIR)
    assert user.is_file()
    assert f"wrote {user} (the per-user cache" in captured.out
    assert digest(SHIPPED) == shipped  # the packaged file is untouched
    resolved = WeightTransforms.resolve(demo_checkpoint(), "smooth", None, None, False)
    assert resolved.calibration == str(user)
    # The engine loads it: the file the weight fold reads is the new one.
    from shardlm import LLM

    read = []
    load = transforms.load_calibration
    monkeypatch.setattr(
        transforms, "load_calibration", lambda path, config: read.append(path) or load(path, config)
    )
    with LLM(demo_checkpoint(), arm="smooth", dtype="float32", device="cpu"):
        pass
    assert read == [str(user)]


def test_calibrate_out_inside_the_package_is_refused(data, capsys):
    shipped = digest(SHIPPED)
    for out in (SHIPPED, PACKAGE_DIR / "stats.safetensors", BUILTIN_DIR / "new.safetensors"):
        assert cli_main(["calibrate", "--data", str(data), "--out", str(out), *CHEAP]) == 2
        err = capsys.readouterr().err
        assert "inside the installed shardlm package" in err
        assert not out.exists() or out == SHIPPED
    assert digest(SHIPPED) == shipped


def test_calibrate_says_when_its_file_is_not_the_one_read(ckpt, data, tmp_path, capsys):
    out = tmp_path / "elsewhere.safetensors"
    argv = ["calibrate", "--model", str(ckpt), "--data", str(data), *CHEAP]
    assert cli_main([*argv, "--out", str(out)]) == 0
    assert f"pass --arm-calibration {out}" in capsys.readouterr().out
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert f"wrote {ckpt / CALIBRATION_FILE}" in text and "--arm-calibration" not in text


def test_calibrate_a_read_only_checkpoint(ckpt, data, capsys, monkeypatch):
    monkeypatch.setattr(calibration, "writable_beside", lambda model: False)
    assert cli_main(["calibrate", "--model", str(ckpt), "--data", str(data), *CHEAP]) == 0
    user = user_calibration_path(ckpt)
    assert user.is_file() and not (ckpt / CALIBRATION_FILE).exists()
    assert str(user) in capsys.readouterr().out
    assert WeightTransforms.resolve(ckpt, "both", None, None, False).calibration == str(user)


def test_inspect_without_model_uses_the_builtin_model_and_its_calibration(capsys):
    argv = ["inspect", "--layer", "0", "--prompt", "def f(x):\n    return x", "--device", "cpu"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "tiny-code" in captured.err
    assert f"arm=both (calibration {SHIPPED})" in captured.out
    assert "kurtosis" in captured.out


def test_inspect_smooth_without_calibration_names_both_places(ckpt, capsys):
    argv = ["inspect", "--model", str(ckpt), "--layer", "0", "--prompt", "x", "--arm", "smooth"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert str(ckpt / CALIBRATION_FILE) in err and str(user_calibration_path(ckpt)) in err


def test_the_newer_of_the_two_calibrations_is_read(tmp_path, monkeypatch):
    """A per-user file is keyed by the checkpoint's path: a checkpoint recalibrated (or
    replaced) in place since must not lose to it, nor it to an older checkpoint file."""
    import os

    from shardlm.calibration import calibration_candidates, find_calibration

    monkeypatch.setenv("SHARDLM_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "ckpt"
    model.mkdir()
    user, beside = calibration_candidates(model)
    user.parent.mkdir(parents=True)
    user.write_bytes(b"u")
    beside.write_bytes(b"b")
    os.utime(user, (1_000, 1_000))
    os.utime(beside, (2_000, 2_000))
    assert find_calibration(model) == beside
    os.utime(user, (3_000, 3_000))
    assert find_calibration(model) == user
    beside.unlink()
    assert find_calibration(model) == user
