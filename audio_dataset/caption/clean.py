"""What an LLM returns, made into captions or a named reason why not.

Chat models wrap the caption they were asked for: quotes, markdown (bold, bullets, headings, code
fences), a leading "Caption:" or "Caption 2:", numbering, a reasoning model's <think> block. `clean_caption` strips those, cuts the
text at schema.MAX_CAPTION_CHARS and names what is not a caption: EMPTY (nothing left), REFUSED
("I'm sorry, I cannot ...", "As an AI ..."), WRONG_LANGUAGE (py3langid, as `audiodata filter`
judges captions, on texts long enough to judge). `split_captions` cuts an answer asked for N
captions (numbered lines, bullets, a JSON list) into its captions; `clean_answer` does both and
drops repeats, returning exactly N candidates.
"""
from __future__ import annotations

import functools
import json
import re

from audio_dataset.caption.types import EMPTY, OK, REFUSED, WRONG_LANGUAGE, Candidate
from audio_dataset.schema import MAX_CAPTION_CHARS

# `--language any` (or an empty value) turns the language check off.
ANY_LANGUAGE = "any"
MIN_LANGUAGE_WORDS = 3  # as `audiodata filter`: fewer words are too few to judge
MIN_LANGUAGE_CONFIDENCE = 0.8  # py3langid's normalised probability of its top language

# A reasoning model's thoughts (Qwen3, DeepSeek-R1): closed, or cut off by the token limit.
_THINKING = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^\s*```[\w-]*\s*$", re.MULTILINE)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.MULTILINE)
# A list marker or a number: "- ", "* ", "• ", "1. ", "2) ", "(3) ".
_MARKER = re.compile(r"^\s*(?:[-*+•]\s+|\(?\d{1,2}[.):]\s*(?=\S))")
# "Caption:", "Caption 1:", "**Caption 2**:", "Here is the caption:", "Final caption -".
_LABEL = re.compile(r"^\s*(?:here\s+(?:is|are)\s+(?:the\s+|my\s+|a\s+)?(?:final\s+)?captions?|(?:final\s+)?captions?"
                    r"(?:\s*#?\s*\d{1,2})?)\s*[:\-–—]\s*", re.IGNORECASE)
_BARE_LABEL = re.compile(r"^\s*(?:final\s+)?captions?\s*:?\s*$", re.IGNORECASE)
_EMPHASIS = re.compile(r"(\*\*|__|\*|_|`)(?=\S)(.+?)(?<=\S)\1")
_QUOTES = "\"'`“”‘’«»„‟‹›"
_SPACE = re.compile(r"\s+")
# Control characters (but line breaks and tabs) and U+FFFD, the mark of bytes cut mid-character.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_REFUSAL = re.compile(
    r"^(?:i\s*(?:'|’)?m\s+sorry|i\s+am\s+sorry|sorry\b|i\s+apologi[sz]e|my\s+apologies|as\s+an\s+ai\b|"
    r"as\s+a\s+language\s+model|i\s+(?:cannot|can\s*not|can(?:'|’)t|am\s+unable|(?:'|’)m\s+unable|am\s+not\s+able|"
    r"(?:'|’)m\s+not\s+able|won(?:'|’)t|will\s+not|do\s+not\s+have|don(?:'|’)t\s+have)\b|unfortunately,?\s+i\b)",
    re.IGNORECASE)


# What of one piece is cleaned: a caption and its wrapping fit in twice the caption cap, and
# _EMPHASIS is quadratic in a line's length (an endpoint's 8 MiB answer of " *a" would run for days).
MAX_PIECE_CHARS = 2 * MAX_CAPTION_CHARS


def clean_caption(raw: str, language: str | None = "en", max_chars: int = MAX_CAPTION_CHARS) -> Candidate:
    """One generated caption, cleaned; `text` is None unless the outcome is OK."""
    text = _strip_wrapping(raw[:MAX_PIECE_CHARS] if isinstance(raw, str) else "")
    if not text:
        return Candidate(None, EMPTY, raw)
    if _REFUSAL.match(text):
        return Candidate(None, REFUSED, raw)
    text = text[:min(max_chars, MAX_CAPTION_CHARS)].rstrip()
    if language and language != ANY_LANGUAGE and _language_of(text) not in (None, language):
        return Candidate(None, WRONG_LANGUAGE, raw)
    return Candidate(text, OK, raw)


def _strip_wrapping(text: str) -> str:
    text = _CONTROL.sub("", text)
    text = _THINKING.sub("", text)
    text = _FENCE.sub("", text)
    text = _HEADING.sub("", text)
    lines = []
    for line in text.splitlines():
        line = _EMPHASIS.sub(r"\2", line)
        # A marker and a label can come in either order ("1. Caption: x", "Caption 1: - x").
        for _ in range(2):
            line = _LABEL.sub("", _MARKER.sub("", line, count=1), count=1)
        if line.strip() and not _BARE_LABEL.match(line):
            lines.append(line.strip())
    text = _SPACE.sub(" ", " ".join(lines)).strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    # A lone opening or closing quote (the model was cut off, or quoted only one end).
    if text.count('"') == 1:
        text = text.replace('"', "").strip()
    return text.strip(_QUOTES + " ").strip() if text[:1] in _QUOTES else text


def _language_of(text: str) -> str | None:
    """The language py3langid is sure of, else None. `audiodata filter` takes py3langid's top guess
    for a sample's captions joined; one short caption needs its confidence too ("A dog barks." is
    Danish at 16%), so only a confident guess judges it."""
    if len(text.split()) < MIN_LANGUAGE_WORDS:
        return None
    language, probability = _identifier().classify(text)
    return str(language) if probability >= MIN_LANGUAGE_CONFIDENCE else None


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def split_captions(raw: str, num_captions: int) -> list[str]:
    """The captions in an answer asked for `num_captions`: a JSON list of strings, numbered or
    bulleted items, else one caption per non-empty line (the whole answer when one was asked)."""
    text = _FENCE.sub("", _THINKING.sub("", raw if isinstance(raw, str) else "")).strip()
    listed = _json_list(text)
    if listed is not None:
        return listed
    lines = [line for line in text.splitlines() if line.strip()]
    if any(_MARKER.match(line) or _LABEL.match(line) for line in lines):
        items: list[str] = []
        for line in lines:
            if _MARKER.match(line) or _LABEL.match(line) or not items:
                items.append(line)
            else:  # a wrapped item goes on
                items[-1] += " " + line.strip()
        # A lead-in line ("Here are three captions:") is no caption.
        if len(items) > num_captions and not (_MARKER.match(items[0]) or _LABEL.match(items[0])):
            items = items[1:]
        return items
    return [text] if num_captions == 1 or len(lines) <= 1 else lines


def _json_list(text: str) -> list[str] | None:
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def clean_answer(raw: str, num_captions: int, language: str | None = "en",
                 max_chars: int = MAX_CAPTION_CHARS) -> list[Candidate]:
    """Exactly `num_captions` candidates from one answer: the distinct captions first, then the
    rejected pieces (refused, wrong language), then EMPTY where the answer held too few."""
    kept: list[Candidate] = []
    rejected: list[Candidate] = []
    seen: set[str] = set()
    # An answer asked for N holds N captions and perhaps a lead-in; a million lines are not cleaned one by one.
    for piece in split_captions(raw, num_captions)[:4 * num_captions + 4]:
        candidate = clean_caption(piece, language, max_chars)
        if candidate.outcome != OK:
            rejected.append(candidate)
            continue
        assert candidate.text is not None
        fingerprint = _fingerprint(candidate.text)
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        kept.append(candidate)
    candidates = (kept + rejected)[:num_captions]
    filler = rejected[0].outcome if rejected and not kept else EMPTY
    return candidates + [Candidate(None, filler, raw if filler != EMPTY else "")] * (num_captions - len(candidates))


def _fingerprint(text: str) -> str:
    """Captions that differ only in case, spacing or punctuation are the same caption."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())
