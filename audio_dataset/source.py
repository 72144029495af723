"""The source interface: a source lists items and fetches their bytes; the core does the rest.

A source is one module in `pipelines/` named after it (`pipelines/freesound.py` for
`--source freesound`) that sets `SOURCE = TheSourceClass`. Its declarative definition (homepage,
licence, paper counts) lives in `manifests/<name>.toml`.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from audio_dataset.redaction import has_userinfo


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option): reported as one line, exit code 2."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line for a message: its first line, cut, or its type's name."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class SourceError(Exception):
    """The source failed as a whole (bad token, site down): the run stops with one message."""


class ItemError(Exception):
    """One item failed; `reason` is the short name recorded in the manifest's `error` column."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Item:
    """One input as a source lists it, before any download."""

    source_id: str
    # What `fetch` resolves: a URL, a local path, an archive member...
    locator: str
    text: list[str]
    tag: list[str] = field(default_factory=list)
    license: str = ""
    author: str = ""
    # The public address recorded in the sample (page or download URL).
    url: str = ""
    original_data: dict[str, Any] = field(default_factory=dict)
    # A split the source imposes (Clotho's own splits); None means hash-assigned.
    split: str | None = None
    # Fields the sample's JSON carries beside the schema's own (a benchmark's class labels, ids,
    # fold and split: pipelines/_benchmark.py); a name the schema or the build uses is never overwritten.
    sample_fields: dict[str, Any] = field(default_factory=dict)
    # [start, end] seconds to cut from the fetched audio (AudioSet segments); None keeps it all.
    clip: tuple[float, float] | None = None
    # [reason, detail] of a problem the source found while listing (a broken link, a bad sidecar):
    # the item fails with it, unfetched, so it still gets its manifest row.
    listing_error: list[str] | None = None

    def to_json(self) -> str:
        # The fields as they are (not dataclasses.asdict, which deep-copies): the same JSON, faster.
        return json.dumps({name: getattr(self, name) for name in _ITEM_FIELDS}, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> "Item":
        data = json.loads(raw)
        if data.get("clip") is not None:
            data["clip"] = tuple(data["clip"])
        return cls(**data)


_ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item))


@dataclass
class SourceConfig:
    """What the command line hands a source. Secrets never go here: sources read the environment."""

    input: str | None = None
    base_url: str | None = None
    # Free-form `--source-option key=value` pairs (e.g. a search query).
    options: dict[str, str] = field(default_factory=dict)
    # A folder the source may keep listing state in, so an interrupted listing resumes.
    state_dir: Path | None = None
    # `--contact` (a URL or e-mail) for the User-Agent every web request sends.
    contact: str | None = None
    # Whether media fetches honour robots.txt, X-Robots-Tag and TDM-Rep: the build sets it for a
    # source whose definition says `open_web = true`, unless --ignore-opt-out (audio_dataset.optout).
    honour_opt_outs: bool = False


class Source(abc.ABC):
    """Subclass per source. Instances are pickled to Ray workers, so keep them plain data."""

    name: ClassVar[str]
    # Downloads kept in flight per worker; I/O-bound sources raise it.
    fetch_concurrency: ClassVar[int] = 4

    def __init__(self, config: SourceConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def list_items(self) -> Iterator[Item]:
        """Yield every item, in a stable order (resume depends on it)."""

    @abc.abstractmethod
    def fetch(self, item: Item) -> bytes | Path:
        """Return the item's media bytes (or a local file, read in place), or raise ItemError with a named reason."""

    def list_batches(self) -> Iterator[Any] | None:
        """Optionally, the listing as pyarrow record batches in the index's form (listing.INDEX_SCHEMA:
        source_id, split, item as Item.to_json()), for a source that can make them without an Item per
        row; None (the default): the build lists `list_items()`."""
        return None

    def check(self) -> None:
        """Fail fast with SourceError/UserError before any work (missing token, bad input)."""


def available_sources() -> list[str]:
    import pipelines

    return sorted(m.name for m in pkgutil.iter_modules(pipelines.__path__) if not m.name.startswith("_"))


def load_source(name: str, config: SourceConfig) -> Source:
    if name not in available_sources():
        raise UserError(f"unknown source {name!r}; known: {', '.join(available_sources())}")
    if config.base_url and has_userinfo(config.base_url):
        # Userinfo would ride in every item's URL into the listing and manifest, and requests would
        # send it as Basic auth in place of the source's own header: credentials come from the environment.
        raise UserError("--base-url must not carry user:password (it would be stored with every item's URL "
                        "and would replace the source's own credentials); give credentials through the "
                        "source's environment variables")
    module = importlib.import_module(f"pipelines.{name}")
    source_cls: type[Source] = module.SOURCE
    return source_cls(config)


def read_definition(name: str) -> dict[str, Any]:
    """The declarative definition `manifests/<name>.toml`, or {} when the source ships none."""
    import tomllib
    from importlib import resources

    path = resources.files("manifests") / f"{name}.toml"
    if not path.is_file():
        return {}
    return tomllib.loads(path.read_text(encoding="utf-8"))


def is_open_web(name: str) -> bool:
    """Whether the definition declares `open_web = true`: the source takes item media from public web
    addresses without an API agreement or a purchase, so the build honours the sites' opt-outs
    (audio_dataset.optout). Absent means false (an API with keys, a purchase, local or hub data)."""
    value = read_definition(name).get("open_web", False)
    if not isinstance(value, bool):
        raise UserError(f"manifests/{name}.toml: open_web must be true or false, not {value!r}")
    return value
