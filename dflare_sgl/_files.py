"""File modes of the model folders the package writes."""

from __future__ import annotations

from pathlib import Path


def make_readable(*paths: Path) -> None:
    """Set folders to mode 0755 and files to 0644: readable by all, writable by the owner.

    ``tempfile.mkdtemp`` makes 0700 folders and safetensors writes 0600 files, but a model
    folder is shared: a draft checkpoint handed to a server, a cache baked into a container
    image or kept on a CI runner must be readable by every user.
    """
    for path in paths:
        path.chmod(0o755 if path.is_dir() else 0o644)
