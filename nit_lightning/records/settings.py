"""What made an output folder: one record per folder (or per finished part of one), checked before anything is added.

Every stage that writes a folder (synth, prepare, sample, sweep, reference, demo, a fit's run directory) describes
its work as a `SettingsRecord`: `settings` decide the bytes of the outputs and are compared; `info` says where things
came from (paths, weight file names) and is only recorded. `check` refuses a folder made with other settings with one
message that names each differing key, old -> new, and what to do; `write` stores the record atomically.

    record = SettingsRecord("sample-set", settings={...}, info={...})
    record.check(folder / "provenance.json", what="samples", remedy="use another --out or delete the folder")
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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
        return {"kind": self.kind, "version": self.version, "settings": plain(self.settings), "info": plain(self.info)}

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.as_dict())

    @classmethod
    def read(cls, path: str | Path, kind: str | None = None) -> "SettingsRecord":
        content = read_json(path, "settings record")
        if not isinstance(content, dict) or "settings" not in content:
            raise ValueError(f"{path} is not a settings record of this suite (no 'settings' key)")
        found = content.get("kind", kind)
        if kind is not None and found != kind:
            raise SettingsMismatch(f"{path} records a {found!r}, not a {kind!r}: this folder holds another stage's "
                                   "outputs; use another folder")
        return cls(found, dict(content["settings"]), dict(content.get("info") or {}), int(content.get("version", 1)))

    def differences_from(self, other: "SettingsRecord", ignore: frozenset[str] | set[str] = frozenset()
                         ) -> dict[str, tuple[Any, Any]]:
        """{key: (other's, ours)} over the settings."""
        return differences(other.settings, self.settings, ignore=ignore)

    def check(self, path: str | Path, *, what: str, remedy: str, labels: Mapping[str, str] | None = None,
              ignore: frozenset[str] | set[str] = frozenset(), write: bool = True) -> bool:
        """Refuse (SettingsMismatch) when `path` records other settings; write this record when there is none (and
        `write`). Returns True when a matching record was already there (the folder resumes)."""
        path = Path(path)
        if path.is_file():
            recorded = SettingsRecord.read(path, self.kind)
            diffs = self.differences_from(recorded, ignore)
            if diffs:
                raise SettingsMismatch(
                    f"{path.parent} holds {what} made with other settings ({describe_differences(diffs, labels=labels)}"
                    f", recorded in {path.name}); {remedy}"
                )
            return True
        if write:
            self.write(path)
        return False
