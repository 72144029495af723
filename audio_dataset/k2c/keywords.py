"""Keywords per sample: tags through the AudioSet ontology, or KeyBERT keyphrases from descriptions.

`ontology.json` beside this module is the AudioSet ontology (github.com/audioset/ontology,
CC-BY-SA 4.0, Google), reduced to each class's `id` and `name`; any file in the official format
(a list of {"id", "name", ...}) can replace it with `--ontology`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from audio_dataset.k2c.models import ResolvedModel, resolve_model
from audio_dataset.schema import MAX_CAPTION_CHARS
from audio_dataset.source import UserError

# KeyBERT's own default sentence model; tests pass a local path instead.
DEFAULT_KEYBERT_MODEL = "all-MiniLM-L6-v2"
SYNONYM_MODES = ("first", "all")
# The most of a description KeyBERT is given: its encoder reads a few hundred tokens of it.
MAX_DESCRIPTION_CHARS = 10 * MAX_CAPTION_CHARS

_ONTOLOGY_ID = re.compile(r"^/[a-z]/[0-9a-z_]+$")
_PAREN = re.compile(r"\(([^)]*)\)")
_URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"\S+@\S+\.\S+")
_FILENAME = re.compile(r"\S+\.(wav|mp3|flac|ogg|aiff?|m4a|opus)\b", re.IGNORECASE)
_LICENSE = re.compile(
    r"\b(cc[- ]?(by|0)([- ](nc|sa|nd))*([- ]?\d\.\d)?|public domain( mark)?( \d\.\d)?"
    r"|creative commons( [a-z-]+)*( \d\.\d)?|licen[cs]ed under)(?![\w-])", re.IGNORECASE)
# Closing words of AudioSet names ("Bee, wasp, etc.") that are not sounds.
_NOT_KEYWORDS = {"etc", "etc."}


@dataclass(frozen=True)
class Keyword:
    """One keyword fed to the model; `aliases` (synonyms, qualifiers) also count as mentioning it."""

    text: str
    aliases: tuple[str, ...] = ()

    @property
    def forms(self) -> tuple[str, ...]:
        return (self.text, *self.aliases)


def load_ontology(path: Path | None = None) -> dict[str, str]:
    """AudioSet class id -> display name, from `path` or the copy shipped with the package."""
    try:
        if path is None:
            raw = (resources.files("audio_dataset.k2c") / "ontology.json").read_text(encoding="utf-8")
        else:
            raw = Path(path).read_text(encoding="utf-8")
        return {entry["id"]: entry["name"] for entry in json.loads(raw)}
    except FileNotFoundError:
        raise UserError(f"ontology not found: {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not an AudioSet ontology (list of id/name objects): {exc}") from None


def _split_outside_parens(name: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in name:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _case(word: str) -> str:
    """Lowercase, except acronyms ("CD", "P.A.") whose capitals carry meaning."""
    return word if sum(c.isupper() for c in word) >= 2 else word.lower()


def _clean(phrase: str) -> str:
    return " ".join(_case(w) for w in phrase.split())


def label_keyword(name: str, synonyms: str = "first") -> list[Keyword]:
    """Keywords for one class name: "Male speech, man speaking" has two synonyms, "Whimper (dog)"
    a qualifier. The model sees the first synonym (or each, with synonyms="all") without its
    parenthesis; the rest become aliases. Dots are never separators ("p.a." stays whole)."""
    forms, qualifiers = [], []
    for part in _split_outside_parens(name):
        qualifiers += [q.strip() for q in _PAREN.findall(part) for q in q.split(",") if q.strip()]
        bare = _clean(_PAREN.sub("", part))
        if bare and bare.lower() not in _NOT_KEYWORDS:
            forms.append(bare)
    if not forms:
        return []
    extra = tuple(_clean(q) for q in qualifiers)
    if synonyms == "all":
        return [Keyword(form, tuple(f for f in forms if f != form) + extra) for form in forms]
    return [Keyword(forms[0], tuple(forms[1:]) + extra)]


def tag_keywords(tags: Sequence[Any], ontology: dict[str, str], synonyms: str = "first") -> list[Keyword]:
    """Keywords from a sample's `tag` list: ontology ids become names, free-text tags pass through."""
    if synonyms not in SYNONYM_MODES:
        raise ValueError(f"synonyms must be one of {SYNONYM_MODES}")
    keywords: list[Keyword] = []
    seen: set[str] = set()
    for tag in tags:
        tag = str(tag).strip()
        if tag in ontology:
            found = label_keyword(ontology[tag], synonyms)
        elif _ONTOLOGY_ID.match(tag):
            found = []  # an id this ontology lacks: no name to say
        elif "," in tag or "(" in tag:
            found = label_keyword(tag, synonyms)  # a class name, as the audioset pipeline stores them
        else:
            found = [Keyword(_clean(tag))] if tag else []
        for keyword in found:
            if keyword.text.lower() not in seen:
                seen.add(keyword.text.lower())
                keywords.append(keyword)
    return keywords


def as_strings(value: Any) -> list[str]:
    """A sample's `text` or `tag` as a list: some datasets store one bare string, which is one
    caption or tag, not a list of its characters."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return []  # None, or a number or object an edited JSON holds


def field_value(meta: dict[str, Any], dotted: str) -> Any:
    """`original_data.description` -> meta["original_data"]["description"], or None."""
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def description_text(meta: dict[str, Any], field: str) -> str:
    """The text KeyBERT reads: the description field when the sample has one, else its captions."""
    value = field_value(meta, field)
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        value = " ".join(as_strings(meta.get("text")))
    return clean_description(value[:MAX_DESCRIPTION_CHARS], str(meta.get("author") or "")[:MAX_CAPTION_CHARS])


def clean_description(text: str, author: str = "") -> str:
    """Drop what describes the upload rather than the sound: URLs, licence lines, file names, author."""
    for pattern in (_URL, _EMAIL, _FILENAME, _LICENSE):
        text = pattern.sub(" ", text)
    if author.strip():
        text = re.sub(re.escape(author.strip()), " ", text, flags=re.IGNORECASE)
    return " ".join(text.split())


@dataclass(frozen=True)
class KeyBertSettings:
    model: str = DEFAULT_KEYBERT_MODEL
    top_n: int = 5
    ngram_max: int = 2
    # > 0 turns on maximal marginal relevance with this diversity (KeyBERT's `use_mmr`).
    diversity: float = 0.0
    field: str = "original_data.description"


def resolve_keybert_model(settings: KeyBertSettings, flag: str) -> ResolvedModel:
    # Bare names are sentence-transformers' own models, as KeyBERT and SentenceTransformer read them.
    return resolve_model(settings.model, flag, hub_owner="sentence-transformers")


class KeyphraseExtractor:
    """KeyBERT over a sentence-transformers model (resolved to a local folder by the driver)."""

    def __init__(self, settings: KeyBertSettings, model: ResolvedModel, device: str | None = None) -> None:
        from keybert import KeyBERT
        from sentence_transformers import SentenceTransformer

        self.settings = settings
        try:
            encoder = SentenceTransformer(model.path, device=device)
        except (OSError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot load KeyBERT model {model.spec}: {first[:200]}") from None
        self._keybert = KeyBERT(model=encoder)

    def extract(self, docs: list[str]) -> list[list[str]]:
        """Keyphrases per document, best first; [] for an empty document."""
        results: list[list[str]] = [[] for _ in docs]
        todo = [i for i, doc in enumerate(docs) if doc.strip()]
        if not todo:
            return results
        s = self.settings
        found = self._keybert.extract_keywords(
            [docs[i] for i in todo], keyphrase_ngram_range=(1, s.ngram_max), stop_words="english",
            top_n=s.top_n, use_mmr=s.diversity > 0, diversity=s.diversity or 0.5)
        if len(todo) == 1:
            found = [found]  # KeyBERT returns a flat list for a single document
        for index, phrases in zip(todo, found):
            results[index] = [p for p, _score in phrases if not p.replace(" ", "").isdigit()]
        return results
