"""Runs inside a fresh mount and UTS namespace (under `unshare`): bind-mounts the pod's
volumes at their mount paths, sets the pod's hostname, then execs the container command.

Product code therefore finds its service-account token, config files and secrets at the
paths Kubernetes uses, with no special branch for this harness."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _prepare_target(source_is_dir: bool, target: Path) -> None:
    if source_is_dir:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()


def bind_all(mounts: list[dict[str, Any]]) -> None:
    """Binds every volume at its mount path. Sources are opened first: a volume mounted over a
    directory that holds other sources (an emptyDir at /tmp, say) must not hide them."""
    opened = [(m, os.open(m["source"], os.O_PATH)) for m in mounts]
    # Parents before children, so /workspace does not cover /workspace/data afterwards.
    for mount, fd in sorted(opened, key=lambda item: item[0]["target"].count("/")):
        source = f"/proc/self/fd/{fd}"
        _prepare_target(stat.S_ISDIR(os.fstat(fd).st_mode), Path(mount["target"]))
        _mount(source, mount["target"], _MS_BIND | _MS_REC)
        if mount["readOnly"]:
            _mount(source, mount["target"], _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        os.close(fd)


def keep_visible(paths: list[str]) -> list[tuple[str, int]]:
    """Opens the directories the process itself runs from (the virtualenv, the Python install,
    the project) before any volume is mounted."""
    return [(path, os.open(path, os.O_PATH)) for path in paths if Path(path).is_dir()]


def restore_visible(opened: list[tuple[str, int]]) -> None:
    """A volume mounted over a parent (an emptyDir at /tmp when the project lives in /tmp/...)
    hides them; bind them back so the container's command still runs."""
    for path, fd in opened:
        current = Path(path).stat() if Path(path).exists() else None
        original = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (original.st_dev, original.st_ino):
            Path(path).mkdir(parents=True, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, _MS_BIND | _MS_REC)
        os.close(fd)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    visible = keep_visible(spec.get("keepVisible", []))
    bind_all(spec["mounts"])
    restore_visible(visible)
    socket.sethostname(spec["hostname"])
    os.chdir(spec["workingDir"])
    argv: list[str] = spec["argv"]
    env: dict[str, str] = spec["env"]
    try:
        os.execvpe(argv[0], argv, env)  # noqa: S606 (the container command, as given)
    except OSError as exc:
        # Kubernetes reports this as a container that could not start (exit 127/126).
        print(f"exec {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()
