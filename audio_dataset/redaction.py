"""Keeping a run's secrets out of every message and file: the one redaction every writer uses.

The secrets a run holds are the values of the environment variables the source definitions name as
credentials (`env = [...]` in manifests/*.toml, plus the storage and Hub ones below) and those a
request carries (its Authorization and Cookie headers, token-like query values, a URL's password).
Text from a response or a URL is scrubbed of the whole of each secret and of any run of
`MIN_RUN` of its characters (a body can quote part of a token), and a cut quote that ends with a
secret's first characters (or starts with its last) loses them too.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "***"
# A secret shorter than this is too common a string to scrub (it would mask ordinary words).
MIN_SECRET = 4
# Any run of this many characters of a secret is scrubbed wherever it appears.
MIN_RUN = 8
# Credentials no source definition names but a run may hold: the Hub's and object storage's.
_STORAGE_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AZURE_STORAGE_KEY")
# A name that says its value is a credential: `token` but not `max_new_tokens` or `tokenizer`.
SECRET_NAME = re.compile(r"(token(?!s|iz)|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)
# Query parameters that carry a credential though their names do not say so (signed URLs, `key=`).
_SECRET_PARAMS = frozenset({"key", "sig", "signature", "x-amz-signature", "x-amz-credential", "code"})
# `token=V`, `api_key=V`... in free text, and `Bearer V`.
_SECRET_PAIR = re.compile(r"(?i)((?:token|key|api_key|apikey|access_token|client_secret|secret|password|sig|"
                          r"signature)=)[^&\s'\"]+|(bearer\s+)[A-Za-z0-9._~+/=-]+")
# `scheme://user:password@host`: the userinfo of a URL is a credential wherever it appears.
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")
_AUTH_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


@functools.cache
def secret_env_names() -> frozenset[str]:
    """Every environment variable a shipped source definition names as its credential."""
    import tomllib
    from importlib import resources

    names = set(_STORAGE_ENV)
    for entry in resources.files("manifests").iterdir():
        if entry.name.endswith(".toml"):
            env = tomllib.loads(entry.read_text(encoding="utf-8")).get("env", [])
            names.update(name for name in env if isinstance(name, str))
    return frozenset(names)


def env_secrets() -> list[str]:
    """The values of those variables set in this process (read now: tests and workers set them late)."""
    values = (os.environ.get(name, "").strip() for name in sorted(secret_env_names()))
    return [value for value in values if len(value) >= MIN_SECRET]


def request_secrets(url: str, headers: Mapping[str, object] | None = None,
                    params: Mapping[str, object] | None = None) -> list[str]:
    """The credentials one request carries: auth and cookie headers (and the token after `Bearer`),
    token-like parameters and query values, the URL's password."""
    found: list[str] = []
    for name, value in (headers or {}).items():
        if name.lower() in _AUTH_HEADERS or SECRET_NAME.search(name):
            text = str(value)
            # `Bearer T` -> T; `a=x; b=y` -> x, y: each part is a secret on its own.
            found += [text, *text.split()[1:], *(part.split("=", 1)[-1] for part in text.split(";"))]
    parts = urlsplit(url)
    pairs = list((params or {}).items()) + parse_qsl(parts.query)
    found += [str(value) for name, value in pairs
              if SECRET_NAME.search(str(name)) or str(name).lower() in _SECRET_PARAMS]
    if parts.password:
        found.append(unquote(parts.password))
    return [secret.strip() for secret in found if len(secret.strip()) >= MIN_SECRET]


def mask_userinfo(text: str) -> str:
    """`s3://key:secret@host/x` -> `s3://***@host/x`."""
    return _URL_USERINFO.sub(rf"\1{MASK}@", text)


def has_userinfo(url: str) -> bool:
    return bool(_URL_USERINFO.match(url.strip()))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` fit for a message or a file: the run's secrets (and `secrets`) scrubbed, URL userinfo,
    credential-looking query values and bearer tokens masked."""
    text = scrub(text, [*env_secrets(), *secrets])
    text = mask_userinfo(text)
    return _SECRET_PAIR.sub(lambda m: (m.group(1) or m.group(2)) + MASK, text)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Each secret, each run of MIN_RUN of its characters, and a secret's start or end where the
    text is cut, replaced by MASK."""
    if not text:
        return text
    hidden = bytearray(len(text))
    for secret in {s for s in secrets if len(s) >= MIN_SECRET}:
        for start, end in _secret_spans(text, secret):
            hidden[start:end] = b"\1" * (end - start)
    if not any(hidden):
        return text
    out, i = [], 0
    while i < len(text):
        if hidden[i]:
            while i < len(text) and hidden[i]:
                i += 1
            out.append(MASK)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _secret_spans(text: str, secret: str) -> Iterable[tuple[int, int]]:
    run = min(MIN_RUN, len(secret))
    pieces = {secret[i:i + run] for i in range(len(secret) - run + 1)}
    for i in range(len(text) - run + 1):
        if text[i:i + run] in pieces:
            yield i, i + run
    # A quote cut inside a secret: its first (or last) characters at the text's end (or start).
    for n in range(min(run, len(text)) - 1, MIN_SECRET - 1, -1):
        if text.endswith(secret[:n]):
            yield len(text) - n, len(text)
            break
    for n in range(min(run, len(text)) - 1, MIN_SECRET - 1, -1):
        if text.startswith(secret[-n:]):
            yield 0, n
            break


__all__ = ["MASK", "SECRET_NAME", "env_secrets", "has_userinfo", "mask_userinfo", "redact", "request_secrets",
           "scrub", "secret_env_names"]
