"""A ring of the last N promoted states on disk. Each checkpoint is a folder written under a
temporary name and renamed into place (tensors in a safetensors file with SHA-256 digests, the rest
as JSON, a manifest with the files' checksums written last), so a crash or kill -9 at any moment
leaves every earlier checkpoint loadable; a corrupted checkpoint is refused by name."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from bem.online._checks import positive_int
from bem.serialization import atomic_write, fsync_dir, load_file, save_file, sha256_file

log = logging.getLogger("bem")

TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
FORMAT = "bem.online-checkpoint"
VERSION = 1
_NAME = re.compile(r"ckpt-(\d{8})")


class CheckpointRing:
    """directory: where the checkpoints live (created). capacity: N, the newest N are kept.

    :meth:`save` returns the new checkpoint's sequence number; :meth:`load` returns (tensors,
    doc) of one; :meth:`latest` the newest one that verifies (falling back, with a warning, past
    corrupted ones). Leftover temporary folders of an interrupted save are removed on open."""

    def __init__(self, directory: str | os.PathLike, capacity: int = 5):
        self.directory = Path(directory)
        self.capacity = positive_int(capacity, "capacity")
        self.directory.mkdir(parents=True, exist_ok=True)
        for tmp in self.directory.glob(".tmp-ckpt-*"):
            log.info("checkpoints: removing the unfinished %s", tmp.name)
            shutil.rmtree(tmp, ignore_errors=True)

    def sequence(self) -> list[int]:
        """Sequence numbers of the checkpoint folders present, oldest first."""
        out = []
        for p in self.directory.iterdir():
            m = _NAME.fullmatch(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, seq: int) -> Path:
        return self.directory / f"ckpt-{seq:08d}"

    def save(self, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> int:
        """Write one checkpoint (tensors: name → tensor; doc: JSON-serialisable, no NaN/inf) and
        drop the oldest beyond capacity. Nothing is visible under the final name until every file
        is written and synced."""
        try:
            text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"doc: not JSON-serialisable without NaN/inf ({exc})") from None
        seqs = self.sequence()
        seq = seqs[-1] + 1 if seqs else 0
        final = self.path(seq)
        tmp = self.directory / f".tmp-ckpt-{seq:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_file(tensors, tmp / TENSORS, {"format": FORMAT})
            atomic_write(tmp / STATE, (text + "\n").encode())
            manifest = {"format": FORMAT, "format_version": VERSION, "sequence": seq,
                        "sha256": {n: sha256_file(tmp / n) for n in (TENSORS, STATE)}}
            atomic_write(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.directory)
        for old in self.sequence()[:-self.capacity]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return seq

    def load(self, seq: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, doc) of checkpoint `seq`, verified: ValueError naming the file for a missing,
        truncated, tampered or mismatched one."""
        folder = self.path(seq)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such checkpoint")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder / MANIFEST}: unreadable ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
                manifest.get("format_version") != VERSION or manifest.get("sequence") != seq:
            raise ValueError(f"{folder / MANIFEST}: not the manifest of checkpoint {seq}")
        digests = manifest.get("sha256")
        if not isinstance(digests, dict) or set(digests) != {TENSORS, STATE}:
            raise ValueError(f"{folder / MANIFEST}: no checksums of {TENSORS} and {STATE}")
        for name, digest in digests.items():
            if not (folder / name).is_file():
                raise ValueError(f"{folder / name}: missing")
            if sha256_file(folder / name) != digest:
                raise ValueError(f"{folder / name}: checksum mismatch (corrupted or tampered)")
        tensors, _ = load_file(folder / TENSORS)
        try:
            doc = json.loads((folder / STATE).read_text())
        except (OSError, ValueError) as exc:  # pragma: no cover - the checksum matched
            raise ValueError(f"{folder / STATE}: unreadable ({exc})") from None
        return tensors, doc

    def latest(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        """(seq, tensors, doc) of the newest checkpoint that verifies; ValueError when none does."""
        errors = []
        for seq in reversed(self.sequence()):
            try:
                tensors, doc = self.load(seq)
            except ValueError as exc:
                log.warning("checkpoints: skipping checkpoint %d: %s", seq, exc)
                errors.append(str(exc))
                continue
            return seq, tensors, doc
        raise ValueError(f"{self.directory}: no loadable checkpoint"
                         + (f" ({'; '.join(errors)})" if errors else ""))
