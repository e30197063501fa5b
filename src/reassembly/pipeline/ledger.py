"""What a run directory remembers about each stage, and the rule that decides whether a stage runs again.

``stages/NAME.json`` is written when a stage starts (``status: running``) and again when it finishes (``status: done``).
It holds the stage's *key*, a hash of the settings the stage was run with and of the digests of the upstream
artifacts it read, the settings themselves (to say what changed), and when done, the sha256 of every artifact file it
wrote plus their combined *digest*, which is what downstream stages hash into their own key.

The rule (:meth:`Ledger.decide`), for a stage with the key the current recipe gives it:

* done with the same key and every artifact file intact: **skip**;
* done with the same key but an artifact missing or altered: remove the stage's outputs, **run** it again;
* started with the same key but not done (interrupted, or stopped on purpose): **resume**, leaving its outputs in
  place for the stage's own resume logic (the similarity stage's progress file, the training loop's checkpoints);
* a different key (the recipe's section changed, or an upstream artifact is not the one it was built from):
  remove the stage's outputs and **run** it again;
* no record (a new run directory): **run**; but if the stage's outputs are there without a record (files that
  ``reassembly run`` did not write, or whose record was deleted), refuse, naming them: ``--force`` replaces them.

A stage that runs again writes new artifacts, so its digest changes and every stage downstream of it runs again too;
stages that do not depend on it are left alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReassemblyError
from ..io import sha256_of, write_text

STAMPS = "stages"


def hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Decision:
    """What to do with a stage: ``skip``, ``resume`` or ``run`` (``clean``: remove its outputs first), and why."""

    action: str
    reason: str
    clean: bool = False


class Ledger:
    """The stage records of one run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def path(self, stage: str) -> Path:
        return self.run_dir / STAMPS / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        path = self.path(stage)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and "key" in record else None

    @staticmethod
    def key(settings: dict, upstream: dict[str, str]) -> str:
        return hash_json({"settings": settings, "upstream": upstream})

    def decide(self, stage: str, key: str, settings: dict, upstream: dict[str, str], outputs: tuple[str, ...] = (),
               force: bool = False) -> Decision:
        if force:
            return Decision("run", "--force", clean=True)
        record = self.read(stage)
        if record is None and self.path(stage).is_file():
            return Decision("run", f"its record {STAMPS}/{stage}.json is unreadable", clean=True)
        if record is None:
            found = [relative for relative in outputs if (self.run_dir / relative).exists()]
            if found:
                raise ReassemblyError(
                    f"{self.run_dir / found[0]} exists but {self.path(stage)} does not say what made it (it was not "
                    "written by `reassembly run`, or its record was deleted); choose another --out, or pass --force "
                    "to replace it")
            return Decision("run", "new")
        if record["key"] != key:
            return Decision("run", _what_changed(record, settings, upstream), clean=True)
        if record.get("status") != "done":
            return Decision("resume", "resuming the unfinished stage")
        problem = self.verify(record)
        if problem:
            return Decision("run", problem, clean=True)
        return Decision("skip", "up to date")

    def verify(self, record: dict) -> str | None:
        """None when every artifact file the record lists is present and unchanged, else what is wrong."""
        for relative, expected in record.get("files", {}).items():
            path = self.run_dir / relative
            if not path.is_file():
                return f"{relative} is missing"
            if sha256_of(path) != expected:
                return f"{relative} is corrupt or was changed after the stage wrote it (sha256 differs)"
        return None

    def begin(self, stage: str, key: str, settings: dict, upstream: dict[str, str]) -> None:
        write_text(self.path(stage), json.dumps({"stage": stage, "status": "running", "key": key,
                                                 "settings": settings, "upstream": upstream,
                                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")

    def finish(self, stage: str, files: list[Path], seconds: float) -> str:
        """Record the finished stage's artifact files; return its digest."""
        record = self.read(stage) or {}
        hashes = {path.relative_to(self.run_dir).as_posix(): sha256_of(path) for path in sorted(set(files))}
        record.update(status="done", files=hashes, digest=hash_json(hashes), seconds=round(seconds, 2),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_text(self.path(stage), json.dumps(record, indent=1) + "\n")
        return record["digest"]

    def clean(self, stage: str, outputs: list[str]) -> None:
        """Remove a stage's outputs and its record, so that it starts afresh."""
        for relative in outputs:
            path = self.run_dir / relative
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        self.path(stage).unlink(missing_ok=True)


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _what_changed(record: dict, settings: dict, upstream: dict[str, str]) -> str:
    old, new = _flatten(record.get("settings", {})), _flatten(settings)
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key, "(unset)") != new.get(key, "(unset)")]
    if changed:
        shown = ", ".join(f"{key} {json.dumps(old.get(key, '(unset)'))} -> {json.dumps(new.get(key, '(unset)'))}"
                          for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"settings changed: {shown}{more}"
    before = record.get("upstream", {})
    moved = [name for name in upstream if before.get(name) != upstream[name]]
    if moved:
        return f"{' and '.join(moved)} changed upstream"
    return "the stage's record does not match this recipe"
