"""The on-disk cache of converted models, first-position tables and token maps.

Every process of a multi-GPU or multi-node run needs the same files. One of them builds each file
under a lock (`filelock`, beside the file, so it works across nodes on a shared filesystem) while the
others wait and then load it; files are written to a unique temporary name and renamed into place,
so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def cache_dir() -> Path:
    """Where converted models and tables live; override with LIT_INVERSION_CACHE."""
    root = os.environ.get("LIT_INVERSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lit_inversion"
    )
    return Path(root)


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Held while one process checks for and builds `path`; the others wait, then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        yield


def temporary_name(path: Path) -> Path:
    """A sibling name no other process (on this node or another) can pick."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def built_once(path: Path, build: Callable[[], object], load: Callable[[Path], object],
               saved: Callable[[object], object] = lambda value: value):
    """`load(path)` if the file exists, else `build()`, saved as `saved(value)`: under the file's lock,
    so the processes of a distributed run build it once and the others wait and load it."""
    with build_lock(path):
        if path.is_file():
            return load(path)
        value = build()
        save_atomically(saved(value), path)
        return value


def save_atomically(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename into place."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    torch.save(obj, tmp)
    tmp.replace(path)
