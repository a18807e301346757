"""An export's manifest.json: its format, and the checks vote runs on it before any model does.

An export folder may come from elsewhere (copied between machines, received from a teammate), so what it
claims is checked: each member file must stay inside the folder (no absolute path, ``..`` or link out of
it: a tampered manifest must not make vote unpickle a file elsewhere) and match its sha256 before it is
loaded. No torch here: ``vote`` refuses a missing or broken export in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from search.errors import UserError, shown
from search.files import sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "spkid-search-export"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ManifestMember:
    """One checkpoint listed in a manifest; ``weight`` is how many votes it holds."""

    file: str
    sha256: str
    weight: float
    trial: int | None
    valid_acc: float | None


@dataclass(frozen=True)
class Manifest:
    """The validated content of an export's manifest.json."""

    path: Path
    study: str
    strategy: str
    fingerprint: str
    data_root: str | None
    data_cache: str | None  # the packed-data cache the study used (absent from older manifests)
    data_index: str | None  # the data set's JSON index digest, to refuse another set before packing it
    split_ratio: float
    split_seed: int
    split_id: str
    members: list[ManifestMember]


def _manifest_error(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; re-create the export with 'spkid-search export-top'")


def member_path(export_dir: Path, name: str, manifest_path: Path) -> Path:
    """Resolve a manifest's member file name, refusing anything that leaves the export folder.

    A manifest is data a user may have received from elsewhere; an absolute path or ``..`` in it must
    not make vote read (and unpickle) a file outside the folder the user pointed at.
    """
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts or name.startswith("~"):
        raise UserError(
            f"{manifest_path}: member path '{name}' escapes the export folder; "
            f"manifest paths must be plain file names inside {export_dir}"
        )
    path = export_dir / rel
    root = export_dir.resolve()
    if not path.resolve().is_relative_to(root):  # a symlink pointing out of the folder
        raise UserError(
            f"{manifest_path}: member path '{name}' resolves outside the export folder "
            f"({path.resolve()}); copy the checkpoint into {export_dir} instead of linking it"
        )
    return path


def read_manifest(export_dir: Path) -> Manifest:
    """Read and validate ``export_dir/manifest.json`` (structure and paths, not checksums yet)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if export_dir.is_file() and export_dir.name == MANIFEST_NAME:
        raise UserError(f"{export_dir}: pass the export folder that holds it ({export_dir.parent})")
    if export_dir.exists() and not export_dir.is_dir():
        raise UserError(
            f"{export_dir}: is a file, not an export folder (one written by 'spkid-search export-top')"
        )
    if not export_dir.is_dir():
        raise UserError(f"{export_dir}: export folder not found; create one with 'spkid-search export-top K'")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path}: not found; is {export_dir} a folder written by 'spkid-search export-top'?"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise _manifest_error(path, f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise _manifest_error(
            path, f"not an spkid-search export manifest (expected format '{MANIFEST_FORMAT}')"
        )
    if raw.get("version") != MANIFEST_VERSION:
        version = shown(raw.get("version"))
        raise _manifest_error(path, f"manifest version {version} is not supported (expected 1)")
    data, split, members = raw.get("data"), raw.get("split"), raw.get("members")
    if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str):
        raise _manifest_error(path, "missing 'data.fingerprint'")
    if not isinstance(split, dict) or not {"ratio", "seed", "split_id"} <= set(split):
        raise _manifest_error(path, "missing 'split' (ratio, seed, split_id)")
    if not isinstance(members, list) or not members:
        raise _manifest_error(path, "'members' must be a non-empty list")
    parsed: list[ManifestMember] = []
    seen: set[str] = set()
    for i, entry in enumerate(members):
        where = f"members[{i}]"
        if not isinstance(entry, dict):
            raise _manifest_error(path, f"'{where}' must be a mapping")
        name, digest, weight = entry.get("file"), entry.get("sha256"), entry.get("weight", 1)
        if not isinstance(name, str):
            raise _manifest_error(path, f"'{where}.file' must be a file name")
        member_path(export_dir, name, path)
        if name in seen:
            raise _manifest_error(path, f"'{where}.file' lists {name} twice")
        seen.add(name)
        if not isinstance(digest, str) or len(digest) != 64:
            raise _manifest_error(path, f"'{where}.sha256' must be a 64-character hex digest")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise _manifest_error(path, f"'{where}.weight' must be a positive number, got {shown(weight)}")
        trial = entry.get("trial")
        acc = entry.get("valid_acc")
        parsed.append(
            ManifestMember(
                file=name,
                sha256=digest.lower(),
                weight=float(weight),
                trial=trial if isinstance(trial, int) else None,
                valid_acc=float(acc) if isinstance(acc, (int, float)) else None,
            )
        )
    try:
        ratio, seed, split_id = float(split["ratio"]), int(split["seed"]), str(split["split_id"])
    except (TypeError, ValueError):
        raise _manifest_error(
            path, "'split' must hold a number ratio, an integer seed and a split_id"
        ) from None
    return Manifest(
        path=path,
        study=str(raw.get("study", "")),
        strategy=str(raw.get("strategy", "")),
        fingerprint=data["fingerprint"],
        data_root=data["root"] if isinstance(data.get("root"), str) else None,
        data_cache=data["cache"] if isinstance(data.get("cache"), str) else None,
        data_index=data["index"] if isinstance(data.get("index"), str) else None,
        split_ratio=ratio,
        split_seed=seed,
        split_id=split_id,
        members=parsed,
    )


def export_data_root(manifest: Manifest) -> Path:
    """The data folder an export's study trained on (the default for ``vote --data``)."""
    if manifest.data_root is None or not (Path(manifest.data_root) / "testdata.json").is_file():
        where = manifest.data_root or "not recorded"
        raise UserError(f"{manifest.path}: the study's data folder ({where}) is not available; pass --data")
    return Path(manifest.data_root)


def export_cache_root(manifest: Manifest) -> Path | None:
    """The packed-data cache the export's study used, so that ``vote`` from another working folder
    reuses its packing instead of packing the set again under ./studies/cache (only reading one this
    user made: see ``data.pack``'s ``reuse_from``); None for the default (also when
    $SPKID_SEARCH_CACHE chooses, or the folder is gone)."""
    if os.environ.get("SPKID_SEARCH_CACHE"):
        return None
    cache = manifest.data_cache
    return Path(cache) if cache and Path(cache).is_dir() else None


def verify_members(export_dir: Path, manifest: Manifest) -> list[Path]:
    """Check every member file against its manifest sha256 before any of them is loaded."""
    paths = []
    for member in manifest.members:
        path = member_path(Path(export_dir), member.file, manifest.path)
        if not path.is_file():
            raise UserError(
                f"{path}: listed in {manifest.path.name} but missing; re-export or restore the file"
            )
        actual = sha256_file(path)
        if actual != member.sha256:
            raise UserError(
                f"{path}: checksum mismatch (sha256 {actual[:12]}.., manifest says {member.sha256[:12]}..): "
                "the file was modified or damaged; re-export it"
            )
        paths.append(path)
    return paths
