"""The contracts between stages, at the bottom of the house (nothing in the package below it):

- files.py       the one atomic writer (temporary name per process, then a rename) and a JSON reader with clear errors
- settings.py    SettingsRecord: what made an output folder; `check` refuses other settings naming the keys
- checkpoint.py  CheckpointMeta: what a checkpoint says about itself (written by training, read by every reader)
- lock.py        one run at a time per output folder (a lock naming its holder; stale locks recognised)

docs/architecture.md ("Contracts between stages") lists which stage writes and reads which record.
"""
from nit_lightning.records.checkpoint import EMA_KEY, META_KEY, CheckpointMeta, SamplingRecipe
from nit_lightning.records.files import atomic_path, read_json, write_bytes, write_json, write_text, write_with
from nit_lightning.records.lock import FolderBusy, folder_lock
from nit_lightning.records.settings import SettingsMismatch, SettingsRecord, describe_differences, differences, plain

__all__ = [
    "CheckpointMeta", "EMA_KEY", "FolderBusy", "META_KEY", "SamplingRecipe", "SettingsMismatch", "SettingsRecord",
    "atomic_path",
    "describe_differences", "differences", "folder_lock", "plain", "read_json", "write_bytes", "write_json",
    "write_text", "write_with",
]
