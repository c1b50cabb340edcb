"""What made an output folder: one record per folder (or per finished part of one), checked before anything is added.

The stages that write a folder (synth, prepare, sample and prompt sets, reference, demo) describe their work as a
`SettingsRecord` (a sweep reuses a finished setting's result only when its record is `same_as` the setting asked
for, else it redoes it; a fit's run directory is checked through its checkpoints' `CheckpointMeta`, training/provenance.py): `settings` decide the bytes of the outputs and are compared; `info` says where things
came from (paths, weight file names) and is only recorded. `check` refuses a folder made with other settings with one
message that names each differing key, old -> new, and what to do; `write` stores the record atomically.

    record = SettingsRecord("sample-set", settings={...}, info={...})
    record.check(folder / "provenance.json", what="samples", remedy="use another --out or delete the folder")
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from nit_lightning.records.files import json_default, read_json, write_json


class SettingsMismatch(ValueError):
    """A folder (or a checkpoint) was made with other settings than the ones asked for now."""


def plain(value: Any) -> Any:
    """Namespaces/mappings -> dicts, tuples -> lists, numpy scalars -> numbers, recursively: what JSON gives back, so
    a record read from disk and one built now compare equal."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return json.loads(json.dumps(value, default=json_default))


def differences(recorded: Mapping[str, Any] | None, now: Mapping[str, Any], *, only_shared: bool = False,
                ignore: frozenset[str] | set[str] = frozenset()) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, now)} for every key whose value differs. `only_shared`: keys only one side has are skipped
    (records of two format versions); otherwise a key present on one side only differs (None on the other)."""
    recorded, now = plain(recorded or {}), plain(now)
    keys = set(recorded) & set(now) if only_shared else set(recorded) | set(now)
    return {k: (recorded.get(k), now.get(k)) for k in sorted(keys - set(ignore)) if recorded.get(k) != now.get(k)}


def describe_differences(diffs: Mapping[str, tuple[Any, Any]], *, labels: Mapping[str, str] | None = None,
                         prefix: str = "", limit: int = 120, sides: tuple[str, str] | None = None) -> str:
    """'mode 'native' -> 'fixed-256', files_sha1 (another input folder …)': each key, old -> new when that is short;
    `labels` explain keys whose values say nothing to a reader (digests). With `sides` (e.g. ("checkpoint",
    "config")): 'key: checkpoint OLD, config NEW; ...', every value in full."""
    labels = labels or {}
    if sides is not None:
        return "; ".join(f"{prefix}{key}: {sides[0]} {old!r}, {sides[1]} {new!r}" for key, (old, new) in diffs.items())
    parts = []
    for key, (old, new) in diffs.items():
        if key in labels:
            parts.append(f"{prefix}{labels[key]}")
        elif len(repr(old)) + len(repr(new)) < limit:
            parts.append(f"{prefix}{key} {old!r} -> {new!r}")
        else:
            parts.append(f"{prefix}{key}")
    return ", ".join(parts)


@dataclass
class SettingsRecord:
    """`kind` names the stage; `settings` are compared, `info` is recorded only; `version` is the record's format."""

    kind: str
    settings: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def as_dict(self) -> dict[str, Any]:
        """On disk: {"kind", "version", "settings", **info} (info at the top, where readers of a manifest look)."""
        reserved = {"kind", "version", "settings"} & set(self.info)
        if reserved:
            raise ValueError(f"a record's info may not use the keys {sorted(reserved)}")
        return {"kind": self.kind, "version": self.version, "settings": plain(self.settings), **plain(self.info)}

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.as_dict())

    @classmethod
    def read(cls, path: str | Path, kind: str | None = None) -> "SettingsRecord":
        """A record from disk; a file from before records (a flat dict of settings) reads as settings only."""
        content = read_json(path, "settings record")
        if not isinstance(content, dict):
            raise ValueError(f"{path} is not a settings record of this suite (a JSON object is expected)")
        if "settings" not in content:
            return cls(kind or "", dict(content), version=0)
        found = content.get("kind") or kind
        if kind is not None and found != kind:
            raise SettingsMismatch(f"{path} records a {found!r}, not a {kind!r}: this folder holds another stage's "
                                   "outputs; use another folder")
        info = {k: v for k, v in content.items() if k not in ("kind", "version", "settings")}
        return cls(found or "", dict(content["settings"]), info, int(content.get("version", 1)))

    def same_as(self, recorded: Mapping[str, Any] | None, *,
                ignore: frozenset[str] | set[str] = frozenset()) -> bool:
        """Whether `recorded` settings equal ours: for outputs that are redone, not refused, when they differ (a
        sweep's per-setting result is a cache of its sample set's metrics)."""
        return not differences(recorded, self.settings, ignore=ignore)

    def refuse_if_different(self, recorded: Mapping[str, Any] | None, *, where: str | Path, what: str, remedy: str,
                            labels: Mapping[str, str] | None = None,
                            ignore: frozenset[str] | set[str] = frozenset()) -> None:
        """SettingsMismatch when `recorded` (the settings found at `where`) differ from ours, naming every key."""
        diffs = differences(recorded, self.settings, ignore=ignore)
        if diffs:
            raise SettingsMismatch(f"{where} holds {what} made with other settings "
                                   f"({describe_differences(diffs, labels=labels)}); {remedy}")

    def check(self, path: str | Path, *, what: str, remedy: str, labels: Mapping[str, str] | None = None,
              ignore: frozenset[str] | set[str] = frozenset(), write: bool = True,
              upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> bool:
        """Refuse (SettingsMismatch) when `path` records other settings; write this record when there is none (and
        `write`). `upgrade` rewrites a recorded dict of an older spelling first. Returns True when a matching record
        was already there (the folder resumes)."""
        path = Path(path)
        if path.is_file():
            recorded = SettingsRecord.read(path, self.kind)
            self.refuse_if_different(upgrade(recorded.settings) if upgrade else recorded.settings, where=f"{path.parent} (see its {path.name})", what=what,
                                     remedy=remedy, labels=labels, ignore=ignore)
            return True
        if write:
            self.write(path)
        return False
