"""segprune's own process: third-party libraries stay quiet, offline and out of the user's home."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys


def test_doctor_prints_only_our_lines_and_leaves_the_users_config_alone(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}  # a user's shell, not this test process
    env.update(HOME=str(home), SEGPRUNE_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-m", "harness.cli", "doctor"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(line.startswith("[ok] ") for line in done.stdout.splitlines()), done.stdout  # ultralytics said nothing
    assert done.stderr == ""
    assert not (home / ".config").exists()  # ultralytics' first-import settings file went to our cache instead
    assert list((cache / f"ultralytics-{importlib.metadata.version('ultralytics')}").rglob("settings.json"))
