"""tierlm.runtime: what it sets for given configs and environments, exactly; and that the tierlm
command puts the OpenMP wait settings in place before torch (libgomp) loads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierlm import runtime
from tierlm.config import RuntimeConfig
from tierlm.runtime import (
    OPENMP_SETTINGS,
    RuntimeSettings,
    apply_runtime,
    libgomp_loaded,
    openmp_additions,
    prepare_openmp,
    resolve_num_threads,
)

REPO = Path(__file__).resolve().parents[1]


def test_openmp_settings_are_added_only_when_the_user_chose_none():
    assert OPENMP_SETTINGS == {"GOMP_SPINCOUNT": "1000"}
    assert openmp_additions({}) == {"GOMP_SPINCOUNT": "1000"}
    assert openmp_additions({"PATH": "/bin", "OMP_NUM_THREADS": "1"}) == {"GOMP_SPINCOUNT": "1000"}
    # either wait variable is the user's choice of policy: neither is touched
    assert openmp_additions({"OMP_WAIT_POLICY": "active"}) == {}
    assert openmp_additions({"GOMP_SPINCOUNT": "0"}) == {}


def test_prepare_openmp_writes_only_before_libgomp_loads():
    env = {"HOME": "/root"}
    assert prepare_openmp(env, loaded=False) == {"GOMP_SPINCOUNT": "1000"}
    assert env == {"HOME": "/root", "GOMP_SPINCOUNT": "1000"}
    env = {"HOME": "/root"}
    assert prepare_openmp(env, loaded=True) == {} and env == {"HOME": "/root"}
    env = {"OMP_WAIT_POLICY": "passive"}
    assert prepare_openmp(env, loaded=False) == {} and env == {"OMP_WAIT_POLICY": "passive"}


def test_libgomp_loaded_reads_the_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 0 08:01 1 /venv/lib/python3.11/site-packages/torch/lib/libgomp-a34b3233.so.1\n")
    assert libgomp_loaded(maps)
    maps.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not libgomp_loaded(maps)
    assert libgomp_loaded()  # this process imported torch


@pytest.mark.parametrize("num_threads,environ,expected", [
    (3, {"OMP_NUM_THREADS": "1"}, (3, "num_threads")),
    (None, {"OMP_NUM_THREADS": "1"}, (1, "OMP_NUM_THREADS")),
    (None, {"OMP_NUM_THREADS": " 4 "}, (4, "OMP_NUM_THREADS")),
    (None, {"OMP_NUM_THREADS": "0"}, (6, "affinity")),
    (None, {"OMP_NUM_THREADS": "2,1"}, (6, "affinity")),  # a nested-levels list: not one count
    (None, {}, (6, "affinity")),
])
def test_resolve_num_threads(num_threads, environ, expected):
    assert resolve_num_threads(RuntimeConfig(num_threads=num_threads), environ, 6) == expected


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_apply_runtime_sets_torch_threads_and_reports_the_environment(monkeypatch, restore_threads, caplog):
    num_cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")
    with caplog.at_level(logging.INFO, logger="tierlm"):
        settings = apply_runtime(RuntimeConfig(num_threads=1))
    assert settings == RuntimeSettings(1, num_cpus, "num_threads", {"GOMP_SPINCOUNT": "500"}, "environment")
    assert torch.get_num_threads() == 1
    assert caplog.messages == [f"runtime: 1 compute threads (from num_threads; {num_cpus} usable cores); "
                               "OpenMP waits: GOMP_SPINCOUNT=500 (environment)"]

    caplog.clear()
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setattr(runtime, "_prepared", {})
    with caplog.at_level(logging.INFO, logger="tierlm"):
        settings = apply_runtime(RuntimeConfig())
    assert settings == RuntimeSettings(num_cpus, num_cpus, "affinity", {}, "defaults")
    assert torch.get_num_threads() == num_cpus
    assert "spin ~3 ms, then sleep (defaults)" in caplog.messages[0]
    assert "set GOMP_SPINCOUNT=1000 in the environment" in caplog.messages[1]  # how to fix it, for API users


def test_apply_runtime_warns_about_more_threads_than_cores(restore_threads, caplog):
    num_cpus = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="tierlm"):
        settings = apply_runtime(RuntimeConfig(num_threads=num_cpus + 1))
    assert settings.num_threads == num_cpus + 1 == torch.get_num_threads()
    assert f"{num_cpus + 1} compute threads on {num_cpus} usable cores" in caplog.text


def _probe(code: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


# The command runs (``info`` loads no torch), then torch is imported: libgomp loads with what the
# command left in the environment.
CLI_PROBE = """
import os, sys
from tierlm.runtime import libgomp_loaded
from tierlm.cli import main
assert main(["info"]) == 0 and not libgomp_loaded()
import torch
print(libgomp_loaded(), os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"), file=sys.stdout)
"""


def test_the_command_sets_the_wait_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k not in runtime.WAIT_VARIABLES}
    assert _probe(CLI_PROBE, env)[-3:] == ["True", "1000", "None"]
    assert _probe(CLI_PROBE, {**env, "OMP_WAIT_POLICY": "active"})[-3:] == ["True", "None", "active"]
