"""`freesound`: sounds from Freesound through the official API v2 (not by scraping the website).

Listing: `GET {api}/search/` (the text search; `/search/text/` was deprecated in Nov 2025 and
redirects there) with `query`, `filter`, `sort`, `page`, `page_size` (at most 150) and `fields`, the
API key as the `token` parameter; pages until `next` is null. The listing is resumable
(`audio_dataset.listing`): a scrape stopped on page 300 (quota, crash) resumes at page 300.
Media: `download=preview` (default) fetches the public preview URL the search returned
(`preview=preview-hq-ogg|preview-hq-mp3|preview-lq-ogg|preview-lq-mp3`; no credentials are sent to
the CDN); `download=original` fetches `{api}/sounds/<id>/download/` with the OAuth2 bearer token.

Captions follow LAION's preprocess_freesound.py: the title without its file extension and with
underscores as spaces, and the first sentence of the description; unlike LAION we strip HTML tags
instead of dropping a sentence that has them, and split sentences at `. ! ?` followed by a space
rather than at every dot ("3.5 s" stays whole). Tags are Freesound's tags; the source id is the
Freesound sound id.

Environment: FREESOUND_API_KEY (search, always), FREESOUND_OAUTH_TOKEN (`download=original`).
Rate: Freesound documents 60 requests/minute and 2000/day per API key, so requests to
freesound.org are paced at 1/s by default (`rate=`; 0 = unlimited); a 429 with a long
Retry-After (the daily quota) stops the run with one message, and a rerun resumes the listing.
"""
from __future__ import annotations

import html
import os
import re
from typing import Any, Iterator
from urllib.parse import urlsplit

from audio_dataset.http import HTTP_OPTION_PREFIX, HttpClient, HttpConfig
from audio_dataset.listing import PagedListing
from audio_dataset.source import Item, ItemError, Source, SourceError, UserError

API_ROOT = "https://freesound.org/apiv2"
KEY_ENV = "FREESOUND_API_KEY"
OAUTH_ENV = "FREESOUND_OAUTH_TOKEN"
MAX_PAGE_SIZE = 150
# 60 requests per minute, Freesound's documented per-key limit.
DOCUMENTED_RATE = 1.0
FIELDS = ("id,url,name,description,tags,license,username,duration,samplerate,channels,type,filesize,"
          "previews")
PREVIEW_KEYS = ("preview-hq-ogg", "preview-hq-mp3", "preview-lq-ogg", "preview-lq-mp3")
OPTIONS = {"query", "filter", "sort", "page_size", "download", "preview", "rate"}
# Bad pages are retried this many times in all before the listing gives up (and can resume).
PAGE_ATTEMPTS = 3

_TAGS = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_AUDIO_EXT = re.compile(r"\.(wav|wave|aiff?|flac|mp3|ogg|oga|opus|m4a|aac|wma|caf)$", re.IGNORECASE)


def clean_title(name: str) -> str:
    """LAION's title cleaning: no file extension, underscores as spaces."""
    return _SPACES.sub(" ", _AUDIO_EXT.sub("", name.strip()).replace("_", " ")).strip()


def first_sentence(description: str) -> str:
    """The description's first sentence, without HTML markup."""
    text = _SPACES.sub(" ", html.unescape(_TAGS.sub(" ", description or ""))).strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip() if text else ""


def _as_sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else f"{text}."


def captions(name: str, description: str) -> list[str]:
    """[title, first sentence of the description], each ending in a full stop (LAION's `text`)."""
    out = []
    for part in (clean_title(name), first_sentence(description)):
        if part and _as_sentence(part) not in out:
            out.append(_as_sentence(part))
    return out


class FreesoundSource(Source):
    name = "freesound"
    fetch_concurrency = 16

    def __init__(self, config) -> None:
        super().__init__(config)
        unknown = {k for k in config.options if not k.startswith(HTTP_OPTION_PREFIX)} - OPTIONS
        if unknown:
            raise UserError(f"unknown freesound option(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(OPTIONS))} and http_* (see audio_dataset.http)")
        options = config.options
        self.api = (config.base_url or API_ROOT).rstrip("/")
        self.query = options.get("query", "")
        self.filter = options.get("filter", "")
        # Oldest first: new uploads land on the last pages, so earlier pages stay put while we page.
        self.sort = options.get("sort", "created_asc")
        self.page_size = _int_option(options, "page_size", MAX_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        self.download = options.get("download", "preview")
        if self.download not in ("preview", "original"):
            raise UserError(f"freesound download must be preview or original, not {self.download!r}")
        self.preview = options.get("preview", PREVIEW_KEYS[0])
        if self.preview not in PREVIEW_KEYS:
            raise UserError(f"freesound preview must be one of {', '.join(PREVIEW_KEYS)}")
        api_host = urlsplit(self.api).netloc
        default_rate = DOCUMENTED_RATE if api_host.endswith("freesound.org") else 0.0
        rate = _float_option(options, "rate", default_rate)
        self.client = HttpClient(HttpConfig.for_source(config), host_rates={api_host: rate} if rate > 0 else None)

    # -- contract -------------------------------------------------------------------------------

    def check(self) -> None:
        if not os.environ.get(KEY_ENV):
            raise UserError(f"freesound needs an API key in ${KEY_ENV} (apply at https://freesound.org/apiv2/apply)")
        if self.download == "original" and not os.environ.get(OAUTH_ENV):
            raise UserError(f"freesound download=original needs an OAuth2 access token in ${OAUTH_ENV}")

    def list_items(self) -> Iterator[Item]:
        self.check()
        fingerprint = {"api": self.api, "query": self.query, "filter": self.filter, "sort": self.sort,
                       "page_size": self.page_size, "fields": FIELDS}
        listing = PagedListing(self.config.state_dir, "freesound", fingerprint)
        for record in listing.run(1, self._fetch_page):
            yield self._item(record)

    def fetch(self, item: Item) -> bytes:
        if not item.text:  # a sound without name or description is no audio-text pair
            raise ItemError("no_caption", "the sound has neither a name nor a description")
        if self.download == "original":
            token = os.environ.get(OAUTH_ENV, "")
            return self.client.get_bytes(item.locator, headers={"Authorization": f"Bearer {token}"},
                                         auth_env=OAUTH_ENV)
        if not item.locator:
            raise ItemError("no_preview", f"the search result has no {self.preview} URL")
        return self.client.get_bytes(item.locator)

    # -- listing --------------------------------------------------------------------------------

    def _fetch_page(self, page: int) -> tuple[list[dict[str, Any]], int | None]:
        params = {"query": self.query, "sort": self.sort, "page": page, "page_size": self.page_size,
                  "fields": FIELDS, "token": os.environ.get(KEY_ENV, "")}
        if self.filter:
            params["filter"] = self.filter
        problem = ""
        for _ in range(PAGE_ATTEMPTS):
            try:
                data = self.client.get_json(f"{self.api}/search/", params=params, auth_env=KEY_ENV)
            except ItemError as exc:
                if exc.reason != "bad_json":  # the client already retried transport failures
                    raise SourceError(f"freesound listing page {page} failed: {exc}; "
                                      f"a rerun resumes at page {page}") from None
                problem = str(exc)
                continue
            problem = _page_problem(data)
            if not problem:
                return data["results"], page + 1 if data.get("next") else None
        raise SourceError(f"freesound listing page {page} is malformed ({problem}) after {PAGE_ATTEMPTS} "
                          f"tries; a rerun resumes at page {page}")

    def _item(self, record: dict[str, Any]) -> Item:
        sound_id = str(record["id"])
        if self.download == "original":
            locator = f"{self.api}/sounds/{sound_id}/download/"
        else:
            locator = (record.get("previews") or {}).get(self.preview, "")
        original = {k: v for k, v in record.items() if k != "previews"}
        return Item(
            source_id=sound_id,
            locator=locator,
            text=captions(record.get("name", ""), record.get("description", "")),
            tag=[str(t) for t in record.get("tags") or []],
            license=str(record.get("license", "")),
            author=str(record.get("username", "")),
            url=str(record.get("url") or f"https://freesound.org/s/{sound_id}/"),
            original_data=original,
        )


def _page_problem(data: Any) -> str:
    """Why a search response is not a usable page ('' when it is)."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        return "no results list"
    for record in data["results"]:
        if not isinstance(record, dict) or "id" not in record:
            return "a result without an id"
    return ""


def _int_option(options: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = options.get(key)
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        raise UserError(f"freesound {key} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise UserError(f"freesound {key} must be between {low} and {high}, not {value}")
    return value


def _float_option(options: dict[str, str], key: str, default: float) -> float:
    raw = options.get(key)
    try:
        value = float(raw) if raw is not None else default
    except ValueError:
        raise UserError(f"freesound {key} must be a number, not {raw!r}") from None
    if value < 0:
        raise UserError(f"freesound {key} must not be negative")
    return value


SOURCE = FreesoundSource
