"""The HW4 layout: its three JSON files read and checked, and one ``uttr-*.pt`` feature file loaded.

``mapping.json`` (speakers and their ids), ``metadata.json`` (each speaker's labelled utterances: file
and length), ``testdata.json`` (the test utterances); every ``feature_path`` a plain name in the set's
folder, every feature file a ``(mel_len, n_mels)`` float tensor read without running code. Nothing here
packs or caches (see :mod:`search.data`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.errors import UserError, shown
from search.files import UnloadableFile, load_tensors, require_data_dir

PREPARE_STATE = "prepare-state.jsonl"  # search.prepare's record, in a set it writes (its index comes last)
FEATURE_NAME = re.compile(r"^[A-Za-z0-9._-]+\.pt$")
LOG_OFFSET = 1e-9  # a feature is log(mel power + this): log(1e-9) is a bin with no energy at all


@dataclass(frozen=True)
class Utterance:
    feature_path: str
    mel_len: int
    label: int  # speaker id, -1 for unlabelled test utterances


@dataclass(frozen=True)
class HW4Layout:
    """The validated JSON side of an HW4 directory (no tensors read yet)."""

    root: Path
    n_mels: int
    speakers: list[str]  # speakers[id] = speaker name, from mapping.json
    train: list[Utterance]
    test: list[Utterance]


def read_prepare_state(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A ``prepare-state.jsonl``'s header and latest record per source (its path relative to the audio
    folder); a torn last line (killed run) is ignored. Read by prepare to resume, and by vote to know an
    utterance by its source file."""
    header: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return header, records
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        if "prepare_state" in entry:
            header = entry
        elif isinstance(entry.get("source"), str):
            records[entry["source"]] = entry
    return header, records


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a key given twice in one object is an error.

    Why: JSON keeps the last copy, so a speaker listed twice in metadata.json (an edit that pasted one
    speaker's key over another's) silently lost the first copy's utterances and trained the rest under
    the wrong name.
    """
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen[key] = value
    return seen


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_repeated_keys)
    except _RepeatedKey as exc:
        raise UserError(
            f"{path}: key {shown(str(exc))} appears twice in one object (JSON would keep only the last); "
            "merge or rename one of them"
        ) from None
    except FileNotFoundError:
        if (path.parent / PREPARE_STATE).is_file():
            raise UserError(
                f"{path.parent}: 'prepare' has not finished this set (it writes {path.name} last); run the "
                "same prepare command again to finish it"
            ) from None
        raise UserError(f"{path}: file not found (is --data the HW4 'Dataset' folder?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); restore the file") from None


def _key(obj: Any, key: str, path: Path, where: str = "") -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{path}: missing key '{where}{key}'")
    return obj[key]


def _utterance(entry: Any, path: Path, where: str, label: int) -> Utterance:
    feature_path = _key(entry, "feature_path", path, where)
    mel_len = _key(entry, "mel_len", path, where)
    if not isinstance(feature_path, str) or not FEATURE_NAME.match(feature_path):
        raise UserError(f"{path}: '{where}feature_path' must be a plain file name like uttr-<hex>.pt")
    if not isinstance(mel_len, int) or isinstance(mel_len, bool) or mel_len < 1:
        raise UserError(f"{path}: '{where}mel_len' must be a positive integer, got {shown(mel_len)}")
    return Utterance(feature_path, mel_len, label)


def read_layout(root: Path) -> HW4Layout:
    """Read mapping.json, metadata.json and testdata.json and check they agree with each other."""
    root = Path(root)
    require_data_dir(root)
    mapping_path, meta_path, test_path = root / "mapping.json", root / "metadata.json", root / "testdata.json"
    mapping = _read_json(mapping_path)
    speaker2id = _key(mapping, "speaker2id", mapping_path)
    id2speaker = _key(mapping, "id2speaker", mapping_path)
    if not isinstance(speaker2id, dict) or not speaker2id:
        raise UserError(f"{mapping_path}: 'speaker2id' must be a non-empty mapping")
    n = len(speaker2id)
    speakers: list[str] = [""] * n
    for name, sid in speaker2id.items():
        if not isinstance(sid, int) or not 0 <= sid < n or speakers[sid]:
            raise UserError(f"{mapping_path}: 'speaker2id.{name}' must be a unique id in 0..{n - 1}")
        speakers[sid] = name
        if not isinstance(id2speaker, dict) or id2speaker.get(str(sid)) != name:
            raise UserError(f"{mapping_path}: 'id2speaker.{sid}' must be '{name}' to match speaker2id")

    meta = _read_json(meta_path)
    n_mels = _key(meta, "n_mels", meta_path)
    if not isinstance(n_mels, int) or isinstance(n_mels, bool) or n_mels < 1:
        raise UserError(f"{meta_path}: 'n_mels' must be a positive integer, got {shown(n_mels)}")
    by_speaker = _key(meta, "speakers", meta_path)
    if not isinstance(by_speaker, dict):
        raise UserError(f"{meta_path}: 'speakers' must be a mapping of speaker -> utterances")
    train: list[Utterance] = []
    for name, entries in by_speaker.items():
        if name not in speaker2id:
            raise UserError(f"{meta_path}: speaker '{name}' is absent from {mapping_path.name}")
        if not isinstance(entries, list):
            raise UserError(f"{meta_path}: 'speakers.{name}' must be a list of utterances")
        for i, entry in enumerate(entries):
            train.append(_utterance(entry, meta_path, f"speakers.{name}[{i}].", speaker2id[name]))
    if not train:
        raise UserError(f"{meta_path}: no labelled utterances")

    testdata = _read_json(test_path)
    test_mels = _key(testdata, "n_mels", test_path)
    if test_mels != n_mels:
        raise UserError(f"{test_path}: n_mels {test_mels} does not match metadata.json's {n_mels}")
    entries = _key(testdata, "utterances", test_path)
    if not isinstance(entries, list):
        raise UserError(f"{test_path}: 'utterances' must be a list")
    test = [_utterance(e, test_path, f"utterances[{i}].", -1) for i, e in enumerate(entries)]
    _refuse_shared_files(train, test, meta_path, test_path, speakers)
    return HW4Layout(root, n_mels, speakers, train, test)


def _refuse_shared_files(
    train: list[Utterance], test: list[Utterance], meta_path: Path, test_path: Path, speakers: list[str]
) -> None:
    """Refuse a feature file listed twice, naming it and both of its places (HW4 lists 64,666)."""
    where: dict[str, str] = {}
    within: dict[int, int] = {}  # a speaker's position in its list, counted as read_layout read them
    places = []
    for utt in train:
        i = within.get(utt.label, 0)
        within[utt.label] = i + 1
        places.append((utt.feature_path, f"{meta_path.name} speakers.{speakers[utt.label]}[{i}]"))
    places += [(u.feature_path, f"{test_path.name} utterances[{i}]") for i, u in enumerate(test)]
    for name, place in places:
        if name in where:
            raise UserError(
                f"{meta_path.parent}: feature_path {name} is listed twice ({where[name]} and {place}); "
                "each utterance needs its own file: delete one entry"
            )
        where[name] = place


# Removing a listed file alone only moves the error: its entry must go too.
LISTED = "metadata.json (or testdata.json) lists it: restore it, or delete its entry there"


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: the packed cache's dtype
FLOAT16_OVERFLOW = 65520.0  # the least value float16 rounds to inf (below it, to 65504 at most)


def load_feature(path: Path, n_mels: int, mel_len: int | None = None) -> torch.Tensor:
    """Load one ``uttr-*.pt`` safely (weights_only) and check it is a (mel_len, n_mels) float tensor."""
    try:
        tensor = load_tensors(path)
    except FileNotFoundError:
        raise UserError(f"{path}: feature file not found; {LISTED}") from None
    except UnloadableFile as exc:
        raise UserError(
            f"{path}: unreadable tensor file: {exc}; restore it, or delete it and its entry in "
            "metadata.json (or testdata.json)"
        ) from None
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"{path}: holds a {type(tensor).__name__}, expected a tensor (mel_len, {n_mels})")
    if tensor.layout != torch.strided or tensor.is_meta:  # sparse, or shapes without values
        kind = "a meta (value-less)" if tensor.is_meta else f"a {str(tensor.layout).removeprefix('torch.')}"
        raise UserError(f"{path}: holds {kind} tensor, expected a dense (mel_len, {n_mels}) float tensor")
    if tensor.dim() != 2:
        raise UserError(f"{path}: tensor of shape {tuple(tensor.shape)}, expected (mel_len, {n_mels})")
    if not tensor.is_floating_point():
        raise UserError(
            f"{path}: tensor of {str(tensor.dtype).removeprefix('torch.')} values, expected floating point "
            "(log-mel features, as HW4's float32)"
        )
    if tensor.shape[1] != n_mels:
        raise UserError(
            f"{path}: n_mels mismatch: tensor has {tensor.shape[1]} mel bins, metadata says {n_mels}"
        )
    if mel_len is not None and tensor.shape[0] != mel_len:
        raise UserError(
            f"{path}: tensor has {tensor.shape[0]} frames but the metadata says mel_len {mel_len}"
        )
    # One pass for both checks: the extremes are NaN if any value is, and infinite if any value is.
    low, high = (float(v) for v in torch.aminmax(tensor.detach())) if tensor.numel() else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UserError(f"{path}: tensor holds NaN or infinite values")
    peak = max(-low, high)
    if peak >= FLOAT16_OVERFLOW:
        # The cache holds float16: such a value became inf there, and the model's logits NaN (a
        # prediction of the first speaker, silently, or a trial "diverged").
        raise UserError(
            f"{path}: holds {peak:.6g}, beyond float16's range (+-{FLOAT16_MAX:g}) that the packed cache "
            "keeps; store log-mel features (as HW4's), not linear power or amplitude"
        )
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every value exactly
        tensor = tensor.float()
    return tensor.detach()  # a feature saved while it required grad is data like any other
