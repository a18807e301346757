"""The Kaggle submission CSV (``Id,Category`` rows in testdata.json order) and the checks vote and predict
run before their long work: the export or checkpoint they were given, and the file they will write.

No torch at import: ``vote`` refuses a missing export or an --out it must not replace before it loads
torch or packs a data set.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from search.errors import UserError
from search.files import atomic_write, check_can_create
from search.manifest import Manifest, read_manifest, verify_members

CSV_HEADER = ("Id", "Category")
SUBMISSION_HEADER = ",".join(CSV_HEADER).encode()  # what an earlier submission starts with
ANSWERS_NAME = "answers.csv"


def read_answers(path: Path) -> dict[str, str]:
    """``answers.csv`` (Id,Category) of a synthetic or scored set: id -> speaker name."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not rows or tuple(rows[0]) != CSV_HEADER:
        raise UserError(f"{path}: first line must be 'Id,Category'; fix or remove the file")
    answers: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise UserError(f"{path}: line {n} must have 2 fields (Id,Category), got {len(row)}")
        answers[row[0]] = row[1]
    return answers


def write_submission(
    out: Path, ids: Sequence[str], categories: Sequence[str], speakers: Sequence[str], force: bool
) -> None:
    """Write the Kaggle CSV atomically after checking every id appears once and every label is known."""
    if len(ids) != len(categories):
        raise UserError(f"{out}: {len(ids)} test ids but {len(categories)} predictions (internal mismatch)")
    if len(set(ids)) != len(ids):
        raise UserError(f"{out}: a test id appears twice in testdata.json; fix the data set")
    known = set(speakers)
    unknown = sorted({c for c in categories if c not in known})
    if unknown:
        raise UserError(
            f"{out}: predicted unknown speaker(s) {', '.join(unknown[:3])}; the checkpoint does not match"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(out, text=True, overwrite=force) as fh:  # without --force: never clobbers
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(CSV_HEADER)
            writer.writerows(zip(ids, categories, strict=True))
    except FileExistsError:
        raise UserError(
            f"{out}: already exists; pass --force to overwrite it or choose another --out"
        ) from None


def check_out(out: Path, force: bool, inputs: Sequence[Path | None] = ()) -> Path:
    """Refuse an --out that is a folder, exists (without --force), cannot be created, or that --force
    would wrongly replace with the CSV: one of this command's inputs (the checkpoint, a file of the
    export or data folder) or any file that is not an earlier submission (a study database, a
    checkpoint of another export)."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is None or not out.exists():
            continue
        base = Path(given).resolve()
        if target == base or base in target.parents:
            where = "is" if target == base else "is a file of"
            raise UserError(f"--out {out}: {where} {given}, an input of this command; choose another --out")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out must name a CSV file, e.g. {out / 'submission.csv'}")
    if out.exists() and all((out.parent / name).is_file() for name in ("metadata.json", "testdata.json")):
        # A data set's answers.csv has a submission's header: --force would destroy another set's key.
        raise UserError(
            f"--out {out}: is a file of the data set in {out.parent} (its answers, maybe), never replaced; "
            "choose another --out"
        )
    if out.exists() and not is_submission(out):  # before the advice to pass --force, which would not do
        raise UserError(
            f"--out {out}: exists and is not a submission CSV (no 'Id,Category' header); --force replaces "
            "only an earlier submission: choose another --out"
        )
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; pass --force to overwrite it or choose another --out")
    check_can_create(out)
    return out


def is_submission(path: Path) -> bool:
    """Whether ``path`` starts like a CSV this module writes (an earlier vote or predict)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(SUBMISSION_HEADER) + 1).rstrip(b"\r\n") == SUBMISSION_HEADER
    except OSError:
        return False


def preflight(
    out: Path, force: bool, export_dir: Path | None = None, checkpoint: Path | None = None
) -> Manifest | None:
    """The checks that need no data set, run before the CLI packs one (minutes on the real HW4 set):
    the export's manifest and checksums, or the single checkpoint, and the output file. Returns the
    export's manifest (None without one), so the caller need not read it again."""
    manifest = None
    if export_dir is not None:
        manifest = read_manifest(Path(export_dir))
        verify_members(Path(export_dir), manifest)
    if checkpoint is not None:
        from search.checkpoint import read_checkpoint  # torch: only to read a checkpoint

        read_checkpoint(Path(checkpoint))
    check_out(out, force, (export_dir, checkpoint))
    return manifest
