"""Atomic file writes: a crash never leaves a half-written checkpoint or report behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _default_mode() -> int:
    """The permissions a plain open() would give a new file (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_writable_dir(folder: Path | str, option: str, run_folder: bool = False) -> None:
    """Fail before any work when `folder` could not be created or written (a file in the way, a
    read-only or virtual file system), or, for a `run_folder`, when it holds a symbolic link (the
    run would write through it); creates nothing."""
    from omniquant_pl.errors import OmniQuantError

    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"is under '{existing}', which is a file"
        raise OmniQuantError(f"{option} '{folder}' {where}, not a folder; give a folder path (or move the file)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OmniQuantError(
            f"{option} '{folder}' is not writable: cannot create files in '{existing}' ({err.strerror}); "
            "give a folder on a writable disk"
        ) from None
    links = links_inside(folder) if run_folder and folder.is_dir() else []
    if links:
        more = f" and {len(links) - 1} more" if len(links) > 1 else ""
        raise OmniQuantError(
            f"{option} '{folder}' holds a symbolic link the run did not create ({links[0]} -> "
            f"{os.readlink(links[0])}{more}); a run writes only inside its own folder, never through a link: "
            f"remove the link, or choose another {option}"
        )


def publish_modes(folder: Path) -> None:
    """Give a private staging folder (mkdtemp's 0700) and everything in it the modes the umask gives
    new folders and files."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def links_inside(folder: Path) -> list[Path]:
    """Symbolic links anywhere under `folder` (not followed); the folder itself may be one."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [Path(root) / name for name in [*dirs, *files] if (Path(root) / name).is_symlink()]
    return sorted(found)


def _atomic_fill(path: Path, fill) -> None:
    """Write `path` atomically: `fill(tmp)` writes a temporary file beside it, which is synced and
    renamed into place (or removed if anything fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; results are as readable as other files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, write) -> None:
    """Write `path` atomically through `write(handle)` on an open binary file."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    _atomic_fill(path, fill)


def atomic_write_json(data: Any, path: Path) -> None:
    payload = json.dumps(data, indent=2, default=str).encode("utf-8")
    _atomic_write(path, lambda handle: handle.write(payload))


def atomic_write_text(text: str, path: Path) -> None:
    payload = text.encode("utf-8")
    _atomic_write(path, lambda handle: handle.write(payload))


def atomic_save_torch(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    _atomic_write(path, lambda handle: handle.write(payload))


def atomic_save_safetensors_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Like atomic_save_safetensors, streamed to the file (no second copy of the tensors in memory:
    for the shards of a model written block by block)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_fill(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
