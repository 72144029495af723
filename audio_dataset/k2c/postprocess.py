"""Post-processing of generated captions, as LAION-CLAP describes it: trim, drop captions that lose
every keyword or repeat one, de-bias gendered words, de-duplicate.

Keyword matching works on crude word stems ("barking" matches "bark") so that a fluent caption
is not dropped for inflecting its keyword.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from audio_dataset.k2c.keywords import Keyword

# Outcome of one generated caption, recorded in the manifest.
KEPT = "kept"
EMPTY = "empty"
NO_KEYWORD = "no_keyword"
REPEATED_KEYWORD = "repeated_keyword"
DUPLICATE = "duplicate"

_SPECIAL_TOKENS = re.compile(r"</?s>|<pad>|<unk>")
# Letters and digits of any script ([^\W_]): "über", "café" and "鳥" are words, not separators.
_WORD = re.compile(r"[^\W_]+(?:['.][^\W_]+)*\.?")
_STOPWORDS = frozenset("a an the of and or in on at to for with by from is are be as its it".split())
# The paper's de-biasing: gendered nouns become "person", possessives "their" (plurals follow).
_DEBIAS = {"woman": "person", "man": "person", "women": "people", "men": "people",
           "her": "their", "his": "their", "hers": "theirs"}
_DEBIAS_PATTERN = re.compile(r"\b(" + "|".join(_DEBIAS) + r")\b", re.IGNORECASE)


def stem(word: str) -> str:
    word = word.lower().strip(".").removesuffix("'s")
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith("ed"):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    # running -> runn -> run; applied to every word so "buzz" and "buzzing" still meet at "buz".
    if len(word) > 3 and word[-1] == word[-2]:
        word = word[:-1]
    return word


def content_stems(text: str) -> list[str]:
    return [stem(w) for w in _WORD.findall(text) if w.lower().strip(".") not in _STOPWORDS]


def trim(caption: str) -> str:
    """Strip model tokens, whitespace and stray separators; start with a capital."""
    text = " ".join(_SPECIAL_TOKENS.sub(" ", caption).split())
    text = text.strip(" \"'`|,;:-")
    return text[:1].upper() + text[1:]


def debias(caption: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = _DEBIAS[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    return _DEBIAS_PATTERN.sub(swap, caption)


def normalize(caption: str) -> str:
    """The form captions are compared in for de-duplication."""
    return " ".join(re.sub(r"[\W_]+", " ", caption.lower()).split())


def mentions_keyword(caption: str, keywords: list[Keyword]) -> bool:
    """True when a content word of any keyword (or of one of its aliases) is in the caption."""
    words = set(content_stems(caption))
    return any(words & set(content_stems(form)) for k in keywords for form in k.forms)


def repeats_keyword(caption: str, keywords: list[Keyword]) -> bool:
    """True when the caption says a keyword's word more often than the keywords themselves do
    ("dog, dog barking" -> "the dog and the dog"), so overlapping labels ("speech",
    "male speech") do not count as repetition."""
    allowed = Counter(s for k in keywords for s in content_stems(k.text))
    said = Counter(content_stems(caption))
    return any(said[s] > max(1, allowed[s]) for s in allowed)


@dataclass
class Processed:
    captions: list[str] = field(default_factory=list)
    # One outcome per generated caption, in generation order.
    outcomes: list[str] = field(default_factory=list)


def postprocess(generated: list[str], keywords: list[Keyword], originals: list[str]) -> Processed:
    """Keep the generated captions worth training on; a repeat of an original caption is a duplicate."""
    seen = {normalize(t) for t in originals}
    result = Processed()
    for raw in generated:
        text = trim(raw)
        if not normalize(text):
            outcome = EMPTY
        elif not mentions_keyword(text, keywords):
            outcome = NO_KEYWORD
        elif repeats_keyword(text, keywords):
            outcome = REPEATED_KEYWORD
        else:
            text = debias(text)
            outcome = DUPLICATE if normalize(text) in seen else KEPT
        if outcome == KEPT:
            seen.add(normalize(text))
            result.captions.append(text)
        result.outcomes.append(outcome)
    return result
