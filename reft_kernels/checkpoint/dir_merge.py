"""Crash-safe checkpoint writes into a directory that may hold other files.

pyreft and HF save into directories that already hold other files (a run directory with
``args.json``, a Trainer output directory with ``checkpoint-N/``). A save here:

1. **stages** the complete new checkpoint in ``<dir>/.reft-staging/`` (fsynced);
2. refuses (FileExistsError naming the file) if a staged name exists in ``<dir>`` and is not one
   of our checkpoint files (``owned``), before changing anything;
3. writes the **journal** ``.reft-staging/journal.json`` atomically: the names to install and
   the stale checkpoint files of the old save to remove (ours, not in the new save);
4. **commits**: removes the stale files, renames each staged file into place (``os.replace``,
   atomic per file), fsyncs the directory and deletes ``.reft-staging``.

A crash before the journal exists leaves the old checkpoint untouched (the staging folder is
discarded later); a crash after it is rolled forward: :func:`recover` finishes the commit from
the journal, and every save and every load runs it first. So a reader always sees the old or the
new checkpoint, and files that are not ours are never written, moved or deleted.

A directory that does not exist yet is written beside it and renamed into place (one atomic
rename).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, List

STAGING = ".reft-staging"
JOURNAL = "journal.json"

__all__ = ["STAGING", "write_checkpoint_dir", "recover"]


def _fsync_file(path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(path: str, staging: str, journal: dict) -> None:
    """Apply a journal: idempotent, so a crash inside it is finished by running it again."""
    for name in journal["remove"]:
        target = os.path.join(path, name)
        if os.path.isfile(target):
            os.remove(target)
    for name in journal["install"]:
        src = os.path.join(staging, name)
        if os.path.exists(src):
            os.replace(src, os.path.join(path, name))
    _fsync_dir(path)
    shutil.rmtree(staging)


def recover(path) -> None:
    """Finish (journal present) or discard (no journal) a save that was interrupted in ``path``."""
    staging = os.path.join(os.fspath(path), STAGING)
    if not os.path.isdir(staging):
        return
    journal_file = os.path.join(staging, JOURNAL)
    if not os.path.isfile(journal_file):
        shutil.rmtree(staging)   # staging never completed: the old checkpoint is intact
        return
    with open(journal_file, encoding="utf-8") as f:
        journal = json.load(f)
    _commit(os.fspath(path), staging, journal)


def _write_new(path: str, write: Callable[[str], None]) -> str:
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp)
        for f in os.listdir(tmp):
            _fsync_file(os.path.join(tmp, f))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_checkpoint_dir(path, write: Callable[[str], None], owned: Callable[[str, str], bool]) -> str:
    """Run ``write(folder)`` (it writes the checkpoint's files into an empty folder) and put those
    files into the directory ``path`` as described in the module docstring.

    ``owned(path, name)``: whether the existing file ``path/name`` is one of our checkpoint files
    (replaceable; removed when the new save does not write it). Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        return _write_new(path, write)
    if not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is a file, not a directory; choose a directory to "
                              "save the checkpoint in")
    recover(path)
    staging = os.path.join(path, STAGING)
    os.mkdir(staging)
    try:
        write(staging)
        install: List[str] = sorted(os.listdir(staging))
        foreign = [n for n in install if os.path.exists(os.path.join(path, n)) and not owned(path, n)]
        if foreign:
            raise FileExistsError(f"{path} already holds {', '.join(foreign)}, which "
                                  f"{'is' if len(foreign) == 1 else 'are'} not ReFT checkpoint "
                                  "files; refusing to overwrite: save into another directory")
        for name in install:
            _fsync_file(os.path.join(staging, name))
        remove = sorted(n for n in os.listdir(path) if n != STAGING and n not in install
                        and os.path.isfile(os.path.join(path, n)) and owned(path, n))
        journal = {"install": install, "remove": remove}
        tmp_journal = os.path.join(staging, JOURNAL + ".tmp")
        with open(tmp_journal, "w", encoding="utf-8") as f:
            json.dump(journal, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_journal, os.path.join(staging, JOURNAL))
        _fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _commit(path, staging, journal)   # a failure here leaves the journal: recover() finishes it
    return path
