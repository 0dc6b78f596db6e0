"""Reading training records from JSONL files, Parquet files, folders of them and Hugging Face datasets.

Three record forms are accepted (one per line or row; forms may be mixed):

- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``, optionally with a
  ``"system"`` string that becomes the first message; roles are ``system`` (first only), ``user``, ``assistant`` and
  ``tool``, with at least one ``assistant`` message;
- ``{"prompt": ..., "response": ...}``, optionally with ``"system"``: one user turn and one assistant turn;
- ``{"text": ...}``: plain text, the loss is on every token (continued pre-training).

Every record keeps its origin (``file:line`` or ``file, row N``), which each error message names.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_horizon.data.errors import DataError

FORMATS = ("auto", "jsonl", "parquet", "hf")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ROLES = ("system", "user", "assistant", "tool")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Record:
    """One validated training example."""

    source: str
    """Where it came from: ``file:line``, ``file, row N`` or ``dataset[split], row N``."""
    messages: tuple[dict[str, str], ...] | None = None
    """Chat messages (``role``/``content``), for chat and prompt/response records; None for plain text."""
    text: str | None = None
    """The text of a plain-text record; None for chat records."""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def parse_record(raw: Any, source: str) -> Record:
    """Validate one raw record and normalise it; raises ``DataError`` naming ``source`` and what is wrong."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{source}: 'system' must be a string, got {type(system).__name__}")
    if "messages" in raw and raw["messages"] is not None:
        messages = _check_messages(raw["messages"], source)
        if system:
            if messages[0]["role"] == "system":
                raise DataError(f"{source}: both a 'system' field and a first message with role 'system'")
            messages = [{"role": "system", "content": system}, *messages]
        return Record(source=source, messages=tuple(messages))
    if "prompt" in raw or "response" in raw:
        for key in ("prompt", "response"):
            if not isinstance(raw.get(key), str):
                got = "missing" if raw.get(key) is None else f"a {type(raw[key]).__name__}"
                raise DataError(f"{source}: field {key!r} must be a string, it is {got}")
        messages = [{"role": "user", "content": raw["prompt"]}, {"role": "assistant", "content": raw["response"]}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return Record(source=source, messages=tuple(messages))
    if "text" in raw:
        if not isinstance(raw["text"], str) or not raw["text"]:
            raise DataError(f"{source}: field 'text' must be a non-empty string")
        return Record(source=source, text=raw["text"])
    keys = ", ".join(sorted(map(str, raw))) or "none"
    raise DataError(f"{source}: expected 'messages', 'prompt'+'response' or 'text' fields, found: {keys}")


def _check_messages(messages: Any, source: str) -> list[dict[str, str]]:
    if not isinstance(messages, list | tuple) or not messages:
        raise DataError(f"{source}: 'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{source}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{source}: messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise DataError(f"{source}: messages[{i}] has role 'system'; only the first message may be a system one")
        if not isinstance(content, str):
            got = "missing" if content is None else f"a {type(content).__name__}"
            raise DataError(f"{source}: messages[{i}]['content'] must be a string, it is {got}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{source}: no 'assistant' message, so nothing to train on")
    return out


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            source = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    source,
                    DataError(
                        f"{source}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
                        "JSONL files must be UTF-8 encoded"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as exc:
                yield source, DataError(f"{source}: malformed JSON ({exc.msg} at column {exc.colno})")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc
    for row, raw in enumerate(table.to_pylist(), start=1):
        yield f"{path}, row {row}", raw


def _iter_hf(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"loading {name!r} as a Hugging Face dataset needs the 'datasets' package: pip install datasets"
        ) from exc
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{name}: no split {split!r}; it has {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (FileNotFoundError, HTTP errors, ...)
        raise DataError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): {exc}") from exc
    for row, raw in enumerate(ds, start=1):
        yield f"{name}[{split}], row {row}", raw


def _is_hf_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def resolve_sources(path: str, format: str = "auto") -> list[tuple[str, str]]:
    """The (format, location) pairs that ``path`` stands for; raises ``DataError`` if there are none."""
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    p = Path(path).expanduser()
    if format == "hf":
        return [("hf", str(p) if p.exists() else path)]
    if p.is_file():
        if format != "auto":
            return [(format, str(p))]
        if p.suffix in JSONL_SUFFIXES:
            return [("jsonl", str(p))]
        if p.suffix in PARQUET_SUFFIXES:
            return [("parquet", str(p))]
        raise DataError(f"{p}: unknown file type {p.suffix!r}; expected .jsonl, .json or .parquet (or set format)")
    if p.is_dir():
        if format == "auto" and _is_hf_folder(p):
            return [("hf", str(p))]
        suffixes = {"auto": JSONL_SUFFIXES + PARQUET_SUFFIXES, "jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES}
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes[format])
        if not files:
            raise DataError(f"{p}: folder has no {' / '.join(suffixes[format])} files")
        return [("parquet" if f.suffix in PARQUET_SUFFIXES else "jsonl", str(f)) for f in files]
    looks_local = path.startswith(("/", ".", "~")) or p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES
    if format == "auto" and not looks_local and _HUB_ID.match(path):
        return [("hf", path)]
    raise DataError(f"{path}: no such file or directory")


def read_records(
    path: str,
    format: str = "auto",
    split: str = "train",
    skip_bad_rows: bool = False,
    parse: Callable[[Any, str], Any] | None = None,
) -> tuple[list[Any], int]:
    """Read and validate every record under ``path``; returns (records, number of bad rows skipped).

    ``parse(raw, source)`` turns one raw row into a record or raises ``DataError`` (default: :func:`parse_record`;
    preference pairs use :func:`lightning_horizon.data.preference.parse_pair`). With ``skip_bad_rows`` a malformed or invalid row is skipped (counted, and reported in one warning at the end);
    without it the first one raises ``DataError`` naming its file and line.
    """
    parse = parse_record if parse is None else parse
    records: list[Any] = []
    skipped: list[str] = []
    for fmt, location in resolve_sources(path, format):
        rows: Iterable[tuple[str, Any]]
        if fmt == "jsonl":
            rows = _iter_jsonl(Path(location))
        elif fmt == "parquet":
            rows = _iter_parquet(Path(location))
        else:
            rows = _iter_hf(location, split)
        for source, raw in rows:
            try:
                if isinstance(raw, DataError):
                    raise raw
                records.append(parse(raw, source))
            except DataError as exc:
                if not skip_bad_rows:
                    raise
                skipped.append(str(exc))
    if skipped:  # a warning, once (the recipe routes warnings into its log)
        warnings.warn(
            f"{path}: skipped {len(skipped)} bad row(s) (skip_bad_rows=True); first: {skipped[0]}", stacklevel=2
        )
    return records, len(skipped)
