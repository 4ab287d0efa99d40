"""Where graphopt writes: every destination is checked against every file a run reads, before any pass runs.

Files are compared by identity (device and inode, through symlinks and hard links), so a link
to the input is the input; destinations are also compared with each other, by identity and by
resolved path, so a report never replaces the model just written. Files are written into a
temporary folder beside their destination and renamed into place. Such a folder carries a
marker file: the clean-up of folders left by a killed save removes marked folders only, never
a user's folder that happens to have a similar name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from graphopt.errors import ModelSaveError

logger = logging.getLogger(__name__)

FileId = tuple[int, int]  # (st_dev, st_ino)

TEMP_PREFIX = ".graphopt-tmp-"
TEMP_MARKER = ".graphopt-temporary"
_MARKER_TEXT = "graphopt temporary folder: removed when its save ends, or by a later save if it was killed\n"
# A marked temporary folder this old beside an output was left by a save that was killed.
STALE_TEMP_SECONDS = 3600


@dataclass(frozen=True)
class Destination:
    """A file a command will write: what it is (named as the user gave it) and where."""

    what: str  # "the output (-o)", "--report", ...
    path: Path
    creates_folder: bool = False  # the command creates missing parent folders (--report-dir)


def file_id(path: str | os.PathLike[str]) -> FileId | None:
    """The identity of the file ``path`` names, through symlinks; None when there is none."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def protected_files(reads: Iterable[tuple[str, str | os.PathLike[str]]]) -> dict[FileId, str]:
    """Identities of the files a run reads, each with its description; ``reads`` pairs a label with a path.

    A folder (of .npy data) stands for the files directly inside it.
    """
    protected: dict[FileId, str] = {}
    for label, path in reads:
        path = Path(path)
        try:
            files = sorted(path.iterdir()) if path.is_dir() else [path]
        except OSError:  # a folder graphopt cannot list, it cannot read either
            files = []
        for file in files:
            ident = file_id(file)
            if ident is not None:
                protected.setdefault(ident, f"{label} {file}")
    return protected


def check_destinations(destinations: Sequence[Destination], protected: Mapping[FileId, str]) -> None:
    """Refuse a destination that is a file the run reads, clashes with another, or cannot be written.

    Raises:
        ModelSaveError: naming the destination, what it clashes with and the fix.
    """
    claimed: dict[object, Destination] = {}
    for dest in destinations:
        _check_folder(dest)
        ident = file_id(dest.path)
        if ident is not None and ident in protected:
            raise ModelSaveError(
                f"{dest.what} {dest.path} would write over {protected[ident]}, which this run reads. "
                f"Choose another path for {dest.what}."
            )
        for key in (ident, dest.path.parent.resolve() / dest.path.name):
            other = claimed.setdefault(key, dest) if key is not None else dest
            if other is not dest:
                raise ModelSaveError(
                    f"{dest.what} {dest.path} and {other.what} {other.path} are the same file: one would "
                    "replace the other. Give each its own path."
                )


def _check_folder(dest: Destination) -> None:
    path, what = dest.path, dest.what
    if path.is_dir():
        raise ModelSaveError(f"{what} {path}: is a folder. Give the path of a file in it instead.")
    folder = path.parent
    if dest.creates_folder:  # the nearest folder that exists is the one written into
        while not os.path.lexists(folder) and folder != folder.parent:
            folder = folder.parent
    if not folder.exists():
        raise ModelSaveError(f"{what} {path}: folder {folder} does not exist. Create it first.")
    if not folder.is_dir():
        raise ModelSaveError(f"{what} {path}: {folder} is a file, not a folder. Choose another path for {what}.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelSaveError(f"{what} {path}: folder {folder} is not writable. Choose a folder you can write to.")


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A marked temporary folder inside ``folder``, removed when the block ends, however it ends.

    Files written there and renamed into ``folder`` replace their destination atomically.
    """
    remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder))
    try:
        part = tmp / f"{TEMP_MARKER}.part"
        part.write_text(f"{_MARKER_TEXT}pid {os.getpid()}\n", encoding="utf-8")
        part.rename(tmp / TEMP_MARKER)  # the marker appears whole or not at all, even if the process is killed
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    with staging(path.parent) as tmp:
        (tmp / path.name).write_text(text, encoding="utf-8")
        os.replace(tmp / path.name, path)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary folders that a killed save left in ``folder`` (marked ones, old enough to be nobody's now)."""
    now = time.time()
    for entry in folder.glob(f"{TEMP_PREFIX}*"):
        try:
            if _is_graphopt_temporary(entry) and now - entry.lstat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(entry)  # removes links inside, never what they point to
                logger.info("removed %s, left by an interrupted save", entry)
        except OSError:
            continue


def _is_graphopt_temporary(entry: Path) -> bool:
    """Whether ``entry`` is a folder graphopt made (not a link to one): it holds graphopt's marker."""
    if not stat.S_ISDIR(entry.lstat().st_mode):
        return False
    marker = entry / TEMP_MARKER
    if not os.path.lexists(marker) or not stat.S_ISREG(marker.lstat().st_mode):
        return False
    with marker.open("rb") as handle:
        return handle.read(len(_MARKER_TEXT)) == _MARKER_TEXT.encode()
