"""segprune never reaches for the network at run time: every DNS lookup and connection is refused and recorded."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

GUARD = textwrap.dedent("""
    import atexit, json, socket, sys

    attempts = []

    def refuse(name):
        def call(*args, **kwargs):
            attempts.append(f"{name}{args[:2]!r}")
            raise OSError(f"network access during a segprune command: {name}")
        return call

    connect = socket.socket.connect
    def connect_inet_only(self, address):  # local (AF_UNIX) sockets are not the network
        if self.family in (socket.AF_INET, socket.AF_INET6):
            return refuse("connect")(address)
        return connect(self, address)

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
        setattr(socket, name, refuse(name))
    socket.socket.connect = connect_inet_only
    socket.socket.connect_ex = connect_inet_only
    atexit.register(lambda: print("ATTEMPTS " + json.dumps(attempts), file=sys.stderr))

    from harness.cli import main
    sys.argv = ["segprune", *json.loads(sys.argv[1])]
    main()
""")


def guarded(args: list[str], home) -> tuple[int, list[str], str]:
    """Run a segprune command in a fresh process under the guard, from a user's shell (no offline switches set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "HF_", "TRANSFORMERS_"))}
    env.update(HOME=str(home), SEGPRUNE_CACHE=str(home / "cache"))
    done = subprocess.run([sys.executable, "-c", GUARD, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = done.stderr.splitlines()
    attempts = json.loads(next(ln for ln in lines if ln.startswith("ATTEMPTS "))[len("ATTEMPTS "):])
    return done.returncode, attempts, "\n".join(ln for ln in lines if not ln.startswith("ATTEMPTS "))


@pytest.mark.parametrize("args", [
    ["run", "--limit", "1", "--method", "csp", "--method", "none"],  # bundled model, YOLO Seg-First, shapes-ref
    ["doctor"],
])
def test_commands_make_no_network_attempt(tmp_path, args):
    code, attempts, stderr = guarded([*args, *(["--out", str(tmp_path / "run")] if args[0] == "run" else [])],
                                     tmp_path)
    assert code == 0, stderr
    assert attempts == []


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
                    reason="flash-attn can run here")
def test_a_missing_attention_backend_is_one_line_and_offline(tmp_path):
    code, attempts, stderr = guarded(["run", "--model", "random:tiny", "--dataset", "toy:val", "--limit", "1",
                                      "--method", "none", "--attn", "flash_attention_2",
                                      "--out", str(tmp_path / "run")], tmp_path)
    assert code == 2 and attempts == []
    assert stderr.startswith("error: --attn flash_attention_2 ") and len(stderr.strip().splitlines()) == 1, stderr
