"""One exception type for everything a user can fix.

The CLI turns a :class:`UserError` into one line on stderr and a non-zero exit, never a traceback,
so every check that guards user input raises this with the file/key at fault and what to do.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then the errors it arose from (its ``__cause__``, else its ``__context__``), each once.

    Why: Optuna wraps SQLAlchemy errors, and some failures surface while handling others, so what an
    error really is (a lost connection, a full disk) may lie anywhere down the chain.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_TORCH = ("torch", "torchaudio")


def broken_install(exc: BaseException) -> str:
    """Why ``exc`` says torch or torchaudio cannot be loaded ('' when it is something else).

    Why: a torchaudio built for another torch (2.11.1 beside 2.11.0 once came from a plain install)
    fails as ``libtorchaudio.so: undefined symbol``; every command that builds a model printed two or
    three tracebacks for it, where one line can say to reinstall the pinned pair.
    """
    import importlib.util
    import traceback

    if isinstance(exc, ModuleNotFoundError):
        return f"no module named '{exc.name}'" if (exc.name or "").split(".")[0] in _TORCH else ""
    if not isinstance(exc, (ImportError, OSError)):
        return ""
    # Raised by the module-level code of the installed torch or torchaudio (found without importing
    # them), that is while importing it: not torch.load's OSError for a missing file, nor anything from
    # a folder that merely happens to be called torch.
    homes: list[str] = []
    for name in _TORCH:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            homes += [str(Path(home)) + "/" for home in spec.submodule_search_locations or []]
    frames = traceback.extract_tb(exc.__traceback__)
    if homes and any(f.name == "<module>" and f.filename.startswith(tuple(homes)) for f in frames):
        return first_line(exc, 200)
    return ""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (its class name when it has none), for one-line reports."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:limit]


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error line stays one readable line.

    A hostile YAML (an alias bomb) can expand to megabytes; echoing it whole would bury the message.
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def load_failure(exc: BaseException, path: Path | None = None) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words.

    torch's own text opens with a paragraph about changed defaults and suggests re-running with
    ``weights_only=False`` (the unsafe fix); the useful part is the global the file tried to import.
    """
    text = str(exc)
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    head = _head(path, 2) if path is not None else b""
    if head and not head.startswith((b"PK", b"\x80")):  # torch writes zip archives (legacy: pickles)
        return "not a PyTorch file (neither a zip archive nor a pickle)"  # junk, not an attack
    blocked = re.search(r"GLOBAL (\S+)", text)
    if isinstance(exc, pickle.UnpicklingError) and blocked:
        return f"it holds Python objects, not only tensors (it imports {blocked.group(1)}), unsafe to load"
    if head.startswith(b"PK") and (isinstance(exc, OSError) or "central directory" in text or "zip" in text):
        return "the zip archive is cut short or corrupt"  # torch's own words: errno 22, or miniz's paragraph
    if "Weights only load failed" in text:  # not a torch tensor file: say what the unpickler tripped on
        detail = re.search(r"WeightsUnpickler error: \s*(\S[^\n]*)", text)
        why = detail.group(1).strip() if detail else "not a plain tensor file"
        return f"not a plain tensor file ({shown(why, 100).strip(chr(39))}), unsafe to load"
    line = first_line(exc)
    quoted = len(line) > 1 and line[0] == line[-1] and line[0] in "'\""  # a KeyError's text: 'name'
    return line[1:-1] if quoted else line


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""
