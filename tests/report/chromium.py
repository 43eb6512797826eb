"""Find or install Debian's headless Chromium for the report tests.

``ensure_chromium()`` returns the path of a chromium binary, installing Debian's ``chromium``
package with apt-get when it is missing and we are root; otherwise it returns None and a reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    env = os.environ.get("SWAV_CHROMIUM")
    if env and os.access(env, os.X_OK):
        return env
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=timeout, env=env)


def ensure_chromium(timeout: float = 900.0) -> tuple[str | None, str]:
    """(path, "") when chromium is available, else (None, why it could not be installed)."""
    found = find_chromium()
    if found:
        return found, ""
    if shutil.which("apt-get") is None:
        return None, "chromium is not installed and apt-get is not available to install it"
    if os.geteuid() != 0:
        return None, "chromium is not installed and installing it with apt-get needs root"
    try:
        res = _apt("install", "-y", "-q", "--no-install-recommends", "chromium", timeout=timeout)
        if res.returncode != 0:  # package lists may be missing or stale
            upd = _apt("update", "-q", timeout=timeout)
            if upd.returncode != 0:
                return None, f"apt-get update failed: {upd.stderr.strip()[-500:]}"
            res = _apt("install", "-y", "-q", "--no-install-recommends", "chromium", timeout=timeout)
        if res.returncode != 0:
            return None, f"apt-get install chromium failed: {res.stderr.strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"apt-get install chromium did not finish: {e}"
    found = find_chromium()
    return (found, "") if found else (None, "apt-get installed chromium but no chromium binary was found")
