"""Licences, normalised: every licence string our sources emit -> (license_id, license_class).

The id is the SPDX identifier where one exists (`CC-BY-4.0`), else a named id of our own
(`Freesound-Sampling-Plus`, `BBC-RemArc`, `WavCaps-academic`, one per purchased pack). The class says
what you may do with the audio:

- `open`: CC0, public domain, CC BY (credit the author): publishable, commercial use too;
- `sharealike`: CC BY-SA: publishable under the same licence;
- `noncommercial`: CC BY-NC, BY-NC-SA, Sampling+: publishable for non-commercial use;
- `restricted`: research-only terms, purchased packs, YouTube uploaders' terms, and any -ND licence
  (a build resamples and trims: a derivative the licence forbids): do not redistribute;
- `unknown`: a string this table does not know. It is counted, never guessed.

CC strings are read by one small grammar (URL or name: `http(s)://creativecommons.org/licenses/by/3.0/`,
`.../deed.en`, `CC BY-NC 4.0`, `CC-BY 3.0`, `cc-by-4.0`); the sources' own strings by exact text. This
module imports nothing of ours: the manifest and the sample writer both use it.
"""
from __future__ import annotations

import functools
import re

OPEN = "open"
SHAREALIKE = "sharealike"
NONCOMMERCIAL = "noncommercial"
RESTRICTED = "restricted"
UNKNOWN = "unknown"
CLASSES = (OPEN, SHAREALIKE, NONCOMMERCIAL, RESTRICTED, UNKNOWN)

SAMPLING_PLUS = "Freesound-Sampling-Plus"
BBC_REMARC = "BBC-RemArc"
WAVCAPS_ACADEMIC = "WavCaps-academic"
YOUTUBE_TERMS = "YouTube-uploader-terms"
PUBLIC_DOMAIN = "public-domain"

# Non-CC ids: their class, and the page that states the terms (for attribution lines).
NAMED: dict[str, tuple[str, str]] = {
    "CC0-1.0": (OPEN, "https://creativecommons.org/publicdomain/zero/1.0/"),
    "PDM-1.0": (OPEN, "https://creativecommons.org/publicdomain/mark/1.0/"),
    PUBLIC_DOMAIN: (OPEN, ""),
    SAMPLING_PLUS: (NONCOMMERCIAL, "https://creativecommons.org/licenses/sampling+/1.0/"),
    BBC_REMARC: (RESTRICTED, "https://sound-effects.bbcrewind.co.uk/licensing"),
    WAVCAPS_ACADEMIC: (RESTRICTED, "https://github.com/XinhaoMei/WavCaps"),
    YOUTUBE_TERMS: (RESTRICTED, ""),
    "Epidemic-Sound": (RESTRICTED, ""),
    "Audiostock": (RESTRICTED, ""),
    "Sonniss-GDC": (RESTRICTED, ""),
    "WeSoundEffects": (RESTRICTED, ""),
    "Paramount-Motion": (RESTRICTED, ""),
    "Free-To-Use-Sounds": (RESTRICTED, ""),
    # GTZAN's excerpts of commercial recordings: no one granted a licence, so the class is unknown.
    "GTZAN-unlicensed": (UNKNOWN, ""),
}

# The sources' own strings (pipelines/*.py and manifests/*.toml), matched whole after _squash.
_EXACT: dict[str, str | None] = {
    # pipelines/audiocaps.py, pipelines/audioset.py: the captions' or labels' licence is not the audio's.
    "MIT (captions); audio: the YouTube uploader's terms": YOUTUBE_TERMS,
    "MIT (captions, github.com/cdjkim/audiocaps); audio: the YouTube uploader's terms": YOUTUBE_TERMS,
    "CC BY 4.0 (labels); audio: the YouTube uploader's terms": YOUTUBE_TERMS,
    "CC BY 4.0 (labels, ontology); audio: the YouTube uploader's terms": YOUTUBE_TERMS,
    "Audiostock licence (royalty-free purchase); LAION-Audio-630K terms: research use only": "Audiostock",
    "RemArc Licence (BBC): personal, educational and research use only": BBC_REMARC,
    "RemArc Licence: personal, educational and research use only": BBC_REMARC,
    # Clotho's fallback when a clip's metadata has no licence: the licence is the clip's, not known here.
    "per clip (Freesound CC licence in the metadata); captions: Tampere University licence": None,
    "per clip Freesound CC licence (metadata `license`); captions: Tampere University licence": None,
    "Epidemic Sound licence (subscription); LAION-Audio-630K terms: research use only": "Epidemic-Sound",
    "Free To Use Sounds licence (purchased): royalty-free use, no redistribution of the files": "Free-To-Use-Sounds",
    "Free To Use Sounds licence (purchase): royalty-free use, no redistribution of the files": "Free-To-Use-Sounds",
    "Paramount Motion licence (purchased): royalty-free use, no redistribution of the files": "Paramount-Motion",
    "Paramount Motion licence (purchase): royalty-free use, no redistribution of the files": "Paramount-Motion",
    "Sonniss GDC bundle licence: royalty-free, commercial use, no redistribution of the files": "Sonniss-GDC",
    "WeSoundEffects licence (purchased): royalty-free use, no redistribution of the files": "WeSoundEffects",
    "WeSoundEffects licence (purchase): royalty-free use, no redistribution of the files": "WeSoundEffects",
    # pipelines/wavcaps.py: WavCaps' own terms bind every clip, whatever the site's licence was.
    "per sound Freesound CC licence (see its page); WavCaps: academic use only": WAVCAPS_ACADEMIC,
    "RemArc Licence (personal, educational and research use); WavCaps: academic use only": WAVCAPS_ACADEMIC,
    "per sound SoundBible licence (see its page); WavCaps: academic use only": WAVCAPS_ACADEMIC,
    "YouTube uploader's terms; WavCaps captions: academic use only": WAVCAPS_ACADEMIC,
    "academic use only (WavCaps); audio: each site's terms (Freesound CC per sound, BBC RemArc, SoundBible, "
    "YouTube)": WAVCAPS_ACADEMIC,
    # Definitions (manifests/*.toml) of sources whose licence is each item's: known, and deliberately no id.
    "per sound: CC0, CC BY 3.0/4.0, CC BY-NC 3.0/4.0 (Sampling+ on old uploads); recorded per item": None,
    "per dataset (its card); recorded per item from a `license` column when there is one": None,
    "as recorded per item": None,
    # pipelines/fsd50k.py's fallback when the metadata part is not given: each clip's own CC licence.
    "per clip Freesound CC licence (FSD50K metadata clips_info); labels: CC BY 4.0": None,
    # pipelines/gtzan.py: excerpts of commercial recordings that no one licensed.
    "unknown: GTZAN's excerpts come from CDs and radio; no licence granted (research use by custom)":
        "GTZAN-unlicensed",
    # Names (Freesound's API, sidecars, Hugging Face cards).
    "Public domain": PUBLIC_DOMAIN,
    "Public Domain Mark 1.0": "PDM-1.0",
    "Creative Commons 0": "CC0-1.0",
    "CC0": "CC0-1.0",
    "Sampling+": SAMPLING_PLUS,
}

_CC_CLASS = {"by": OPEN, "by-sa": SHAREALIKE, "by-nc": NONCOMMERCIAL, "by-nc-sa": NONCOMMERCIAL,
             "by-nd": RESTRICTED, "by-nc-nd": RESTRICTED}
_CC_URL = re.compile(r"^(?:https?://)?(?:www\.)?creativecommons\.org/(?P<path>[a-z0-9+./-]+?)"
                     r"(?:/(?:deed\.[a-z_-]+|legalcode(?:\.[a-z_-]+)?))?/?$")
_CC_LICENSE_PATH = re.compile(r"^licenses/(?P<code>by(?:-nc)?(?:-sa|-nd)?)/(?P<version>\d\.\d)(?:/(?P<port>[a-z]{2,3}))?$")
# `CC BY-NC 4.0`, `CC-BY 3.0`, `cc-by-4.0`, `CC BY-NC-SA 3.0 US`, `Attribution 4.0 International`...
_CC_NAME = re.compile(r"^(?:creative-commons-|cc-?)(?P<code>by(?:-nc)?(?:-sa|-nd)?)-?v?(?P<version>\d\.\d)"
                      r"(?:-(?P<port>[a-z]{2,3}))?(?:-international)?$")
_CC0_NAME = re.compile(r"^cc-?0(?:-v?1\.0)?(?:-universal)?$")
_MAX_CHARS = 1000  # a licence string longer than this is a pasted text, not a name: unknown


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


_EXACT_SQUASHED = {_squash(k): v for k, v in _EXACT.items()}
_NAMED_SQUASHED = {_squash(k): k for k in NAMED}


def _cc_id(code: str, version: str, port: str | None) -> str:
    return f"CC-{code.upper()}-{version}" + (f"-{port.upper()}" if port else "")


def _from_cc_url(text: str) -> str | None:
    match = _CC_URL.match(text)
    if match is None:
        return None
    path = match["path"]
    if path in ("publicdomain/zero/1.0", "publicdomain/zero/1.0/legalcode"):
        return "CC0-1.0"
    if path == "publicdomain/mark/1.0":
        return "PDM-1.0"
    if path == "licenses/sampling+/1.0":
        return SAMPLING_PLUS
    found = _CC_LICENSE_PATH.match(path)
    return _cc_id(found["code"], found["version"], found["port"]) if found else None


def _from_name(text: str) -> str | None:
    dashed = re.sub(r"[\s_]+", "-", text)
    if _CC0_NAME.match(dashed):
        return "CC0-1.0"
    match = _CC_NAME.match(dashed)
    return _cc_id(match["code"], match["version"], match["port"]) if match else None


def license_id(text: str | None) -> str | None:
    """The id of a licence string, or None when this table does not know it."""
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_CHARS:
        return None
    squashed = _squash(text)
    if squashed in _EXACT_SQUASHED:
        return _EXACT_SQUASHED[squashed]
    if squashed in _NAMED_SQUASHED:
        return _NAMED_SQUASHED[squashed]
    return _from_cc_url(squashed) or _from_name(squashed)


def is_known(text: str | None) -> bool:
    """Whether the table knows this string (an id, or a definition that says the licence is per item)."""
    return license_id(text) is not None or (isinstance(text, str) and _squash(text) in _EXACT_SQUASHED)


def class_of(license_id_: str | None) -> str:
    """The class of a license_id (ours or SPDX as this module writes it)."""
    if not license_id_:
        return UNKNOWN
    if license_id_ in NAMED:
        return NAMED[license_id_][0]
    match = re.match(r"^CC-(BY(?:-NC)?(?:-SA|-ND)?)-\d\.\d(?:-[A-Z]{2,3})?$", license_id_)
    return _CC_CLASS[match[1].lower()] if match else UNKNOWN


def classify(text: object) -> tuple[str | None, str]:
    """(license_id, license_class) of a licence string; (None, "unknown") when it is not in the table
    (or not a string at all: sample JSON is untrusted)."""
    return _classify(text) if isinstance(text, str) else (None, UNKNOWN)


@functools.lru_cache(maxsize=4096)  # a corpus repeats a few strings millions of times
def _classify(text: str) -> tuple[str | None, str]:
    found = license_id(text)
    return found, class_of(found)


def sample_licence(meta: dict) -> tuple[str | None, str]:
    """(license_id, license_class) of a sample JSON, always from its `license` string through this table:
    one answer for samples written before the fields existed and for ones whose fields were edited."""
    return classify(meta.get("license"))


_CC_RANK = {"BY": 1, "BY-SA": 2, "BY-ND": 3, "BY-NC": 4, "BY-NC-SA": 5, "BY-NC-ND": 6}


def permissiveness(license_id_: str | None) -> int:
    """Lower is more permissive: public domain and CC0 0, CC BY 1, BY-SA 2, BY-ND 3, BY-NC 4, BY-NC-SA
    and Sampling+ 5, BY-NC-ND 6, anything else 7 (dedup `--keep license` keeps the lowest)."""
    if license_id_ in ("CC0-1.0", "PDM-1.0", PUBLIC_DOMAIN):
        return 0
    if license_id_ == SAMPLING_PLUS:
        return 5
    match = re.match(r"^CC-(BY(?:-NC)?(?:-SA|-ND)?)-\d\.\d", license_id_ or "")
    return _CC_RANK[match[1]] if match else 7


def needs_attribution(license_id_: str | None) -> bool:
    """Whether the licence asks that the author be credited (every CC BY variant and Sampling+)."""
    return bool(license_id_) and (license_id_.startswith("CC-BY-") or license_id_ == SAMPLING_PLUS)


def license_url(license_id_: str | None) -> str:
    """The page stating the licence's terms ("" when there is none to point at)."""
    if not license_id_:
        return ""
    if license_id_ in NAMED:
        return NAMED[license_id_][1]
    match = re.match(r"^CC-(BY(?:-NC)?(?:-SA|-ND)?)-(\d\.\d)(?:-([A-Z]{2,3}))?$", license_id_)
    if match is None:
        return ""
    port = f"{match[3].lower()}/" if match[3] else ""
    return f"https://creativecommons.org/licenses/{match[1].lower()}/{match[2]}/{port}"


def parse_classes(text: str) -> tuple[str, ...]:
    """`open,sharealike` as classes; a ValueError names one that is not a class."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if bad := [n for n in names if n not in CLASSES]:
        raise ValueError(f"unknown licence class {', '.join(bad)}; classes: {', '.join(CLASSES)}")
    if not names:
        raise ValueError("give at least one licence class")
    return names


def parse_ids(text: str) -> tuple[str, ...]:
    """`CC-BY-4.0,CC0-1.0` as ids; a ValueError names one this table never writes."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if bad := [n for n in names if class_of(n) == UNKNOWN]:
        raise ValueError(f"unknown licence id {', '.join(bad)} (SPDX ids such as CC-BY-4.0, or "
                         f"{', '.join(sorted(k for k in NAMED if not k.startswith(('CC0', 'PDM'))))})")
    if not names:
        raise ValueError("give at least one licence id")
    return names


__all__ = ["CLASSES", "NAMED", "classify", "class_of", "is_known", "license_id", "license_url", "needs_attribution",
           "parse_classes", "parse_ids", "permissiveness", "sample_licence"]
