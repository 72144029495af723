"""Opt-out signals for what an open-web source fetches, read as RFC 9309, X-Robots-Tag and TDM-Rep say.

Which fetches are checked: the item media (`HttpClient.get_bytes` / `download`) of a source whose
definition declares `open_web = true` (it takes files from public web addresses without an API
agreement or a purchase), unless the build runs with `--ignore-opt-out`. An item refused is
`excluded` with the reason `opted_out` and the signal in `error_detail`.

- robots.txt (RFC 9309) of the file's origin, for our product token `audiodata`: the group naming
  it (else `*`), longest matching rule wins, Allow on a tie, `*` and `$` in patterns. A 4xx robots.txt
  allows everything; a 5xx, 429, timeout, connection failure or one over 512 KiB is a complete
  disallow (named: `robots.txt unreachable (http_5xx: ...)`). Fetched once per origin per worker process.
- X-Robots-Tag on the file's response: `noai`, `noimageai`, `none`, `noindex`, unscoped or scoped
  to our token (`audiodata: noai`); another bot's scope (`otherbot: noai`) does not apply.
- TDM-Rep: a `tdm-reservation: 1` response header, or `/.well-known/tdmrep.json` on the origin whose
  longest matching `location` has `tdm-reservation: 1`. A missing or unreadable tdmrep.json declares
  nothing (the header still counts).
This module parses; `audio_dataset.http` fetches and caches (it imports this, not the other way).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from audio_dataset import __version__
from audio_dataset.manifest import OPTED_OUT
from audio_dataset.source import UserError

__all__ = ["OPTED_OUT", "Robots", "TdmRep", "check_contact", "user_agent", "x_robots_refusal"]
PRODUCT = "audiodata"
ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
# RFC 9309 asks crawlers to read at least 500 KiB; a larger file is treated as unreadable.
POLICY_MAX_BYTES = 512 * 1024
# X-Robots-Tag values that refuse use for AI training (noai, noimageai) or any use (none, noindex).
REFUSING_DIRECTIVES = frozenset({"noai", "noimageai", "none", "noindex"})
# Directives whose value has a colon of its own: `unavailable_after: DATE` is not a bot's scope.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_CONTACT = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'*+,=%-]{3,200}")


def check_contact(value: str) -> str:
    """`--contact`: a URL or an e-mail address, printable and header-safe (it goes into User-Agent)."""
    if not _CONTACT.fullmatch(value) or not (value.startswith(("http://", "https://")) or "@" in value):
        raise UserError(f"--contact must be an http(s) URL or an e-mail address (no spaces, at most 200 "
                        f"characters), not {value[:80]!r}")
    if value.startswith(("http://", "https://")) and "@" in value.split("/", 3)[2]:
        raise UserError("--contact URL must not carry user:password")
    return value


def user_agent(contact: str | None = None) -> str:
    """`audiodata/0.1.0 (LAION-Audio-630K-style audio-text dataset builder; +CONTACT)`: the tool and
    whom a site can reach (`--contact`); the product token before the slash is what robots.txt names."""
    tail = f"; +{contact}" if contact else ""
    return f"{PRODUCT}/{__version__} (LAION-Audio-630K-style audio-text dataset builder{tail})"


# --------------------------------------------------------------------------- path patterns


# A policy file is the site's text: bounded work per item whatever it holds.
MAX_RULES = 10_000
MAX_RULE_CHARS = 512


def path_matches(rule: str, target: str) -> bool:
    """Whether a robots.txt / tdmrep path pattern matches `target` from its start: `*` any run of
    characters, a trailing `$` the end. Greedy two-pointer matching, O(len(rule) * len(target)) at
    worst: no regular expression a hostile pattern (`/*a*a*a*...`) could make backtrack for ever."""
    anchored = rule.endswith("$")
    pattern = rule[:-1] if anchored else rule + "*"
    p = t = 0
    star, resume = -1, 0
    while t < len(target):
        if p < len(pattern) and pattern[p] == "*":
            star, resume, p = p, t, p + 1
        elif p < len(pattern) and pattern[p] == target[t]:
            p, t = p + 1, t + 1
        elif star >= 0:
            resume += 1
            p, t = star + 1, resume
        else:
            return False
    return all(c == "*" for c in pattern[p:])


@dataclass(frozen=True)
class Rule:
    allow: bool
    path: str

    def matches(self, target: str) -> bool:
        literal = self.path.split("*", 1)[0].rstrip("$") if "*" in self.path else self.path.rstrip("$")
        return target.startswith(literal) and path_matches(self.path, target)


def _best(rules: list[Rule], target: str) -> Rule | None:
    """The longest matching rule; on equal length the allowing one (RFC 9309 2.2.2)."""
    found = [r for r in rules if r.matches(target)]
    return max(found, key=lambda r: (len(r.path), r.allow)) if found else None


# --------------------------------------------------------------------------- robots.txt


@dataclass
class Robots:
    """A parsed robots.txt: the rules of each user-agent group (lower-cased names; `*` the default)."""

    groups: dict[str, list[Rule]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Robots":
        robots = cls()
        agents: list[str] = []
        in_rules = False  # a user-agent line after rules starts a new group
        rules = 0
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = key.strip().lower(), value.strip()
            if key == "user-agent":
                if in_rules:
                    agents, in_rules = [], False
                agents.append(value.lower())
                for agent in agents:
                    robots.groups.setdefault(agent, [])
            elif key in ("allow", "disallow") and agents:
                in_rules = True
                if value and len(value) <= MAX_RULE_CHARS and rules < MAX_RULES:  # empty Disallow: no rule
                    rules += 1
                    for agent in agents:
                        robots.groups[agent].append(Rule(key == "allow", value))
        return robots

    def refusal(self, token: str, target: str) -> str | None:
        """The rule that keeps `token` from `target` (path and query), or None when it may fetch it."""
        if target == ROBOTS_PATH:
            return None
        named = token.lower()
        rules = self.groups.get(named, self.groups.get("*"))
        if not rules:
            return None
        best = _best(rules, target)
        if best is None or best.allow:
            return None
        group = named if named in self.groups else "*"
        return f"robots.txt Disallow: {best.path} (user-agent {group})"


# --------------------------------------------------------------------------- response headers


def x_robots_refusal(values: list[str], token: str) -> str | None:
    """The refusing directive among X-Robots-Tag header values that applies to `token`, or None.

    Each header line may start with a bot's name (`otherbot: noai, noindex`), scoping what follows
    on that line; a line without one applies to every bot."""
    named = token.lower()
    for value in values:
        scope: str | None = None
        for part in value.split(","):
            part = part.strip()
            head, sep, rest = part.partition(":")
            if sep and head.strip().lower() not in _VALUED_DIRECTIVES:
                scope, part = head.strip().lower(), rest.strip()
            directive = part.lower()
            if directive in REFUSING_DIRECTIVES and scope in (None, named):
                return f"X-Robots-Tag: {value.strip()[:120]}"
    return None


def tdm_header_refusal(value: str | None) -> str | None:
    if value is not None and value.strip() == "1":
        return "tdm-reservation: 1 (TDM-Rep response header)"
    return None


# --------------------------------------------------------------------------- TDM-Rep


@dataclass
class TdmRep:
    """`/.well-known/tdmrep.json`: location patterns, each with tdm-reservation 1 (reserved) or 0."""

    rules: list[Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> "TdmRep":
        """Entries that are not `{"location": str, "tdm-reservation": 0|1}` are skipped; a file that is
        not a JSON list declares nothing."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, ValueError):
            return cls()
        rules = []
        for entry in data if isinstance(data, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
                continue
            reserved = entry.get("tdm-reservation")
            if reserved in (0, 1) and not isinstance(reserved, bool) and len(entry["location"]) <= MAX_RULE_CHARS \
                    and len(rules) < MAX_RULES:
                location = entry["location"]
                rules.append(Rule(allow=reserved == 0, path=location if location.startswith("/") else "/" + location))
        return cls(rules)

    def refusal(self, target: str) -> str | None:
        best = _best(self.rules, target)
        if best is None or best.allow:
            return None
        return f"{TDMREP_PATH} tdm-reservation 1 (location {best.path})"
