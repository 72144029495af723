"""Recipes: one command for a whole corpus (`audiodata build --recipe NAME_OR_FILE --out OUT`).

A recipe is a TOML file (shipped ones in `manifests/recipes/`) naming sources with their inputs,
options, exclusion lists and the environment variables holding their credentials:

    name = "my-corpus"
    [build]                       # `audiodata build` options shared by every source
    samples_per_shard = 256
    [[sources]]
    name = "clotho"               # unique in the recipe: work dir, shard prefix, manifest `source`
    source = "clotho"             # the source module (default: name)
    input = "./clotho"            # ./ and ../ paths are relative to the recipe file
    options = { splits = "development" }
    exclude = ["esc50_freesound_ids.txt"]   # files, or names shipped in manifests/exclusions/
    env = ["FREESOUND_API_KEY"]   # credentials, by name only: their values never leave the environment
    build = { max_seconds = 30 }  # per-source overrides of [build]
    expect = { clips = 3839, hours = 23.99 }   # for `audiodata plan`, when not the definition's
    k2c = { caption_model = "template" }  # `audiodata k2c` options: a captioning step before the shards join

Each source is built by the ordinary `build()` into `OUT/_sources/<name>/` (its own resume state),
one after the other (each on the same Ray instance or cluster), then k2c'd into
`OUT/_sources/<name>.k2c/` where the entry asks for it. When a source has finished, its shards
move to `OUT/<split>/<name>-NNNNNN.tar`, so every split is one folder with one `sizes.json`
(as LAION-CLAP reads it), and `OUT/manifest.parquet` is the sources' manifests merged, the `source`
column holding the recipe's name for each. A source that fails as a whole (missing input,
credential, site down) is reported and the others go on; `OUT/recipe.json` records each source's
outcome, so a rerun skips finished sources and retries the others.
"""
from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from audio_dataset import manifest, storage
from audio_dataset.build import WORK_DIR, write_merged
from audio_dataset.lock import hold_output
from audio_dataset.provenance import RunRecord, definition_checksums, mask_urls, record_run, redact_mapping
from audio_dataset.redaction import redact
from audio_dataset.schema import SIZES_FILE, bad_shard_name
from audio_dataset.shards import read_sizes
from audio_dataset.source import SourceError, UserError, available_sources
from audio_dataset.storage import Location, atomic_write_json, is_local, location, read_json

SOURCES_DIR = "_sources"
STATUS_FILE = "recipe.json"
# `[build]` keys and the `audiodata build` flags they stand for (the CLI validates the values).
BUILD_KEYS = {
    "samples_per_shard": "--samples-per-shard", "sample_rate": "--sample-rate", "channels": "--channels",
    "max_seconds": "--max-seconds", "long_clips": "--long-clips", "segment_seconds": "--segment-seconds",
    "min_seconds": "--min-seconds", "min_source_rate": "--min-source-rate", "splits": "--splits",
    "base_url": "--base-url",
}
SOURCE_KEYS = {"name", "source", "input", "options", "exclude", "env", "build", "expect", "plan", "note", "k2c"}
RECIPE_KEYS = {"name", "title", "paper", "notes", "build", "sources", "missing"}
NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass
class RecipeSource:
    name: str
    source: str
    input: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    # Overrides of the definition's figures for `audiodata plan`: clips, hours, and `[plan]` keys.
    expect: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # `audiodata k2c` flags (caption_model = "template", num_beams = 4, ...) to run on the source's build.
    k2c: dict[str, Any] | None = None


@dataclass
class Recipe:
    name: str
    path: str
    sources: list[RecipeSource]
    title: str = ""
    paper: str = ""
    notes: str = ""
    build: dict[str, Any] = field(default_factory=dict)
    # Parts of the corpus the recipe follows that no source here covers: {name, items, note}.
    missing: list[dict[str, Any]] = field(default_factory=list)

    def source(self, name: str) -> RecipeSource:
        for entry in self.sources:
            if entry.name == name:
                return entry
        raise UserError(f"recipe {self.name} has no source {name!r}; it has {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.sources]


# --------------------------------------------------------------------------- loading


def shipped_recipes() -> list[str]:
    folder = resources.files("manifests") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _recipe_path(name_or_file: str) -> Path:
    path = Path(name_or_file).expanduser()
    if path.suffix == ".toml" or os.sep in name_or_file:
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        return path
    if name_or_file not in shipped_recipes():
        raise UserError(f"unknown recipe {name_or_file!r}; shipped: {', '.join(shipped_recipes())} "
                        "(or give a .toml file)")
    return Path(str(resources.files("manifests") / "recipes" / f"{name_or_file}.toml"))


def load_recipe(name_or_file: str) -> Recipe:
    """A shipped recipe by name, or a TOML file; any mistake in it is one UserError line."""
    path = _recipe_path(name_or_file)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None
    _check_keys(data, RECIPE_KEYS, f"recipe {path.name}")
    raw_sources = data.get("sources") or []
    if not isinstance(raw_sources, list) or not raw_sources:
        raise UserError(f"recipe {path.name} lists no [[sources]]")
    recipe = Recipe(name=str(data.get("name") or path.stem), path=str(path), title=str(data.get("title", "")),
                    paper=str(data.get("paper", "")), notes=str(data.get("notes", "")),
                    build=_build_table(data.get("build", {}), f"recipe {path.name} [build]"),
                    sources=[_source_entry(raw, path) for raw in raw_sources],
                    missing=_missing_parts(data.get("missing", []), f"recipe {path.name}"))
    duplicates = sorted({n for n in recipe.names if recipe.names.count(n) > 1})
    if duplicates:
        raise UserError(f"recipe {path.name} names {', '.join(duplicates)} more than once")
    return recipe


def _table(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a table")
    return data


def _check_keys(data: Any, known: set[str], where: str) -> None:
    unknown = sorted(set(_table(data, where)) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where} must be a list of strings")
    return list(value)


def _missing_parts(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) and "name" in v for v in value):
        raise UserError(f"{where}: [[missing]] entries need a name")
    return list(value)


def _build_table(data: Any, where: str) -> dict[str, Any]:
    _check_keys(data, set(BUILD_KEYS), where)
    return dict(data)


def _source_entry(raw: Any, path: Path) -> RecipeSource:
    _check_keys(raw, SOURCE_KEYS, f"recipe {path.name} source")
    name = str(raw.get("name") or raw.get("source") or "")
    where = f"recipe {path.name} source {name or '(unnamed)'}"
    if not NAME.fullmatch(name):
        raise UserError(f"{where}: name must be lower-case letters, digits, _ and - (it names a folder)")
    source = str(raw.get("source") or name)
    if source not in available_sources():
        raise UserError(f"{where}: unknown source {source!r}; known: {', '.join(available_sources())}")
    options = {str(k): str(v) for k, v in _table(raw.get("options", {}), f"{where} options").items()}
    secret = sorted(k for k in options if redact_mapping({k: ""})[k] == "***")
    if secret:  # a recipe is shared and recorded: credentials stay in the environment
        raise UserError(f"{where}: option(s) {', '.join(secret)} look like credentials; put them in "
                        "environment variables and name those in `env`")
    _check_keys(raw.get("expect", {}), {"clips", "hours"}, f"{where} expect")
    expect = raw.get("expect", {})
    if not all(isinstance(v, (int, float)) and v >= 0 for v in expect.values()):
        raise UserError(f"{where} expect: clips and hours must be numbers")
    _check_keys(raw.get("plan", {}), {"media_kbps", "rate_limits", "latency_s", "note"}, f"{where} plan")
    value = raw.get("input")
    return RecipeSource(
        name=name, source=source, input=_relative_to(path, str(value)) if value else None, options=options,
        exclude=[_exclusion_path(path, e) for e in _strings(raw.get("exclude", []), f"{where} exclude")],
        env=_strings(raw.get("env", []), f"{where} env"), build=_build_table(raw.get("build", {}), f"{where} build"),
        expect={k: float(v) for k, v in expect.items()}, plan=dict(raw.get("plan", {})),
        note=str(raw.get("note", "")), k2c=_k2c_table(raw.get("k2c"), where),
    )


def _k2c_table(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"{where}: k2c must be a table of `audiodata k2c` options "
                        "(k2c = { caption_model = \"template\" })")
    fixed = sorted(set(value) & {"input", "dataset", "out", "workers", "ray_address", "no_progress"})
    if fixed:
        raise UserError(f"{where}: k2c {', '.join(fixed)} are set by the recipe run")
    return dict(value)


def _relative_to(recipe: Path, value: str) -> str:
    """`./x` and `../x` are relative to the recipe file; anything else (an absolute path, a URL, a
    name the source resolves such as AudioSet's `eval`) passes as written."""
    if value.startswith(("./", "../")):
        return str((recipe.parent / value).resolve())
    return os.path.expanduser(value)


def _exclusion_path(recipe: Path, value: str) -> str:
    """A file (as `input`), or the name of a list shipped in manifests/exclusions/."""
    shipped = resources.files("manifests") / "exclusions" / value
    return str(shipped) if "/" not in value and shipped.is_file() else _relative_to(recipe, value)


# --------------------------------------------------------------------------- per-source commands


def work_dir(out: UPath, entry: RecipeSource) -> UPath:
    return out / SOURCES_DIR / entry.name


def result_dir(out: UPath, entry: RecipeSource) -> UPath:
    """Where the source's finished shards are taken from: its build, or its k2c output."""
    return out / SOURCES_DIR / (f"{entry.name}.k2c" if entry.k2c is not None else entry.name)


def source_commands(recipe: Recipe, entry: RecipeSource, out: UPath, pinned: list[str]) -> list[list[str]]:
    """The `audiodata` command lines that make one source of the recipe: its build, then k2c if asked.

    `pinned` holds flags that decide the output (`--limit`): a rerun with other ones is refused.
    """
    argv = ["build", "--source", entry.source, "--out", str(work_dir(out, entry))]
    if entry.input:
        argv += ["--input", entry.input]
    for key, value in {**recipe.build, **entry.build}.items():
        argv += [BUILD_KEYS[key], _flag_value(value)]
    for key, value in entry.options.items():
        argv += ["--source-option", f"{key}={value}"]
    for path in entry.exclude:
        argv += ["--exclude", path]
    commands = [argv + pinned]
    if entry.k2c is not None:
        k2c = ["k2c", str(work_dir(out, entry)), "--out", str(result_dir(out, entry))]
        for key, value in entry.k2c.items():
            flag = "--" + key.replace("_", "-")
            k2c += [flag] if value is True else [] if value is False else [flag, _flag_value(value)]
        commands.append(k2c)
    return commands


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):  # splits = { train = 0.9, valid = 0.1 }
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def missing_credentials(entry: RecipeSource) -> list[str]:
    return [name for name in entry.env if not os.environ.get(name)]


# --------------------------------------------------------------------------- running


@dataclass
class SourceOutcome:
    name: str
    status: str  # "done", "failed", "skipped" (done by an earlier run)
    error: str = ""
    samples: int = 0


def run_recipe(recipe: Recipe, out: UPath, commands: dict[str, list[list[str]]],
               run_command: Callable[[list[str]], Any]) -> list[SourceOutcome]:
    """Make every source in `commands` (name -> its command lines) in turn, then merge the finished.

    `run_command(argv)` runs one `audiodata` command line (the CLI parses it, adds the flags that
    may change between runs such as `--workers`, and runs it), raising UserError/SourceError when
    that source fails as a whole. One recipe run per OUT at a time (each source's build also holds
    its own work folder).
    """
    with hold_output(out, "recipe"):
        return _run_recipe_held(recipe, out, commands, run_command)


def _run_recipe_held(recipe: Recipe, out: UPath, commands: dict[str, list[list[str]]],
                     run_command: Callable[[list[str]], Any]) -> list[SourceOutcome]:
    status = _read_status(out, recipe)
    run = RunRecord("recipe", {"recipe": recipe.name,
                               "sources": {n: [shlex.join(c) for c in cs] for n, cs in commands.items()},
                               "env": {e.name: e.env for e in recipe.sources}},
                    definitions=definition_checksums(sorted({e.source for e in recipe.sources})))
    outcomes = []
    for name, steps in commands.items():
        outcome = _run_source(recipe.source(name), out, steps, status, run_command)
        outcomes.append(outcome)
        if outcome.status != "skipped":
            status["sources"][name] = {"status": outcome.status, "error": outcome.error,
                                       "commands": _recorded(steps, out)}
            atomic_write_json(out / STATUS_FILE, status)
    merge(out, [e for e in recipe.sources if status["sources"].get(e.name, {}).get("status") == "done"])
    record_run(out, run)
    return outcomes


def _read_status(out: UPath, recipe: Recipe) -> dict[str, Any]:
    path = out / STATUS_FILE
    if not path.exists():
        if (out / manifest.MANIFEST_FILE).exists() or (out / WORK_DIR).exists():
            raise UserError(f"{out} holds the build of one source (audiodata build --source); use a new --out")
        return {"recipe": recipe.name, "sources": {}}
    status = read_json(path)
    if status.get("recipe") != recipe.name:
        raise UserError(f"{out} holds recipe {status.get('recipe')!r}, not {recipe.name!r}; use a new --out")
    dropped = sorted(n for n, s in status["sources"].items() if s.get("status") == "done" and n not in recipe.names)
    if dropped:  # their shards are in OUT/<split>/ already: the merged dataset would not describe them
        raise UserError(f"{out} holds source(s) {', '.join(dropped)} that recipe {recipe.name} no longer has; "
                        "use a new --out")
    return status


def _run_source(entry: RecipeSource, out: UPath, steps: list[list[str]], status: dict[str, Any],
                run_command: Callable[[list[str]], Any]) -> SourceOutcome:
    earlier = status["sources"].get(entry.name, {})
    if earlier.get("status") == "done":
        if earlier.get("commands") != _recorded(steps, out):
            raise UserError(f"source {entry.name} in {out} was made with other commands; use a new --out, "
                            "or the same recipe and flags to resume")
        return SourceOutcome(entry.name, "skipped")
    missing = missing_credentials(entry)
    if missing:
        return SourceOutcome(entry.name, "failed", f"needs {', '.join('$' + m for m in missing)} in the environment")
    try:
        for argv in steps:
            run_command(argv)
        samples = publish(out, entry)
    except (UserError, SourceError) as exc:
        # Within a recipe a source's input is given as --recipe-input NAME=PATH (--input is refused).
        return SourceOutcome(entry.name, "failed", redact(
            str(exc).replace("needs --input", f"needs --recipe-input {entry.name}=PATH")))
    return SourceOutcome(entry.name, "done", samples=samples)


def failed_sources(out: Location) -> dict[str, str]:
    """Source name -> why, for each source a recipe run into OUT recorded as failed (OUT/recipe.json;
    none for other outputs). The file is data: only its string fields are used, cut to one line."""
    path = location(out) / STATUS_FILE
    if not path.exists():
        return {}
    try:
        sources = read_json(path).get("sources")
    except (UserError, OSError):
        return {STATUS_FILE: "unreadable: which sources are missing is unknown"}
    if not isinstance(sources, dict):
        return {STATUS_FILE: "holds no sources table"}
    return {_one_line(name, 100): _one_line(state.get("error") or "no reason recorded", 300)
            for name, state in sources.items() if isinstance(state, dict) and state.get("status") == "failed"}


def _one_line(value: Any, limit: int) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _recorded(steps: list[list[str]], out: UPath) -> list[list[str]]:
    """Commands as recipe.json keeps them: OUT as a placeholder (the folder may move, or be named
    by another relative path), credentials in URLs masked."""
    where = str(out)
    return [[mask_urls(arg.replace(where, "{OUT}", 1) if arg.startswith(where) else arg) for arg in argv]
            for argv in steps]


def _shard_target(out: UPath, name: str, split: str, shard: str) -> UPath:
    return out / split / f"{name}-{shard}"


def _split_dirs(folder: UPath) -> list[UPath]:
    """A build's split folders that hold shards (a split whose items all failed has no sizes.json)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")) and (p / SIZES_FILE).exists())


def _listed_shards(split_dir: UPath) -> dict[str, int]:
    """A split's sizes.json; its names are moved and renamed, so each must be a file in that folder."""
    sizes = read_sizes(split_dir)
    for name in sizes:
        if problem := bad_shard_name(name):
            raise UserError(f"{split_dir / SIZES_FILE} lists {name!r}: {problem}; refusing to move it")
    return sizes


def publish(out: UPath, entry: RecipeSource) -> int:
    """Move a finished source's shards into the recipe's split folders; returns its samples.

    Idempotent: a shard already moved (a rerun after a crash mid-way) is left where it is.
    """
    samples = 0
    for split_dir in _split_dirs(result_dir(out, entry)):
        for shard, count in _listed_shards(split_dir).items():
            target = _shard_target(out, entry.name, split_dir.name, shard)
            if not target.exists():
                _move(split_dir / shard, target)
            samples += count
    return samples


def _move(src: UPath, dest: UPath) -> None:
    if is_local(src):
        storage.check_target(Path(src.path))  # a planted link is not moved into the dataset
        storage.make_dirs(Path(dest.path).parent)
        storage.publish(Path(src.path), dest.path)  # same filesystem: one rename, never a partial file
    else:
        src.fs.mv(src.path, dest.path)  # a server-side copy, then the original is deleted


def merge(out: UPath, entries: list[RecipeSource]) -> dict[str, Any]:
    """OUT/manifest.parquet, OUT/<split>/sizes.json and OUT/stats.json over the finished sources,
    streamed a batch of manifest rows at a time."""
    sizes: dict[str, dict[str, int]] = {}

    def tables() -> Iterator[pa.Table]:
        for entry in entries:
            for table in manifest.iter_tables(work_dir(out, entry) / manifest.MANIFEST_FILE):
                yield _renamed(table, entry.name)
            for split_dir in _split_dirs(result_dir(out, entry)):
                for shard, count in _listed_shards(split_dir).items():
                    sizes.setdefault(split_dir.name, {})[f"{entry.name}-{shard}"] = count

    return write_merged(out, tables(), sizes)


def _renamed(table: pa.Table, name: str) -> pa.Table:
    """A source's manifest as the recipe output sees it: its recipe name, shards where they moved."""
    shard = table.column("shard")
    moved = pc.if_else(pc.is_null(shard), shard,
                       pc.replace_substring_regex(shard, r"^([^/]+)/", rf"\1/{name}-"))
    table = table.set_column(table.schema.get_field_index("shard"), "shard", moved)
    source = pa.array([name] * len(table), pa.string())
    return table.set_column(table.schema.get_field_index("source"), "source", source)
