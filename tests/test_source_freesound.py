"""`freesound` against a loopback server speaking Freesound APIv2: search pages, previews, originals."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from audio_dataset.source import ItemError, SourceConfig, SourceError, UserError, load_source
from loopback import LoopbackServer, Request, Response
from pipelines.freesound import FIELDS, captions, clean_title, first_sentence

FIXTURES = Path(__file__).parent / "fixtures" / "freesound"
API_KEY = "test-api-key-0123456789"
OAUTH = "test-oauth-token-abcdef"
# Test-sized HTTP clocks (the policy is the real one).
FAST = {"http_retries": "2", "http_backoff_base": "0.01", "http_backoff_cap": "0.05", "http_stall_timeout": "0.5",
        "http_max_retry_after": "5"}


class FakeFreesound:
    """Serves /apiv2/search/, previews and /apiv2/sounds/<id>/download/ from the fixtures."""

    def __init__(self, server: LoopbackServer, clips: dict[str, bytes]) -> None:
        fixture = json.loads((FIXTURES / "sounds.json").read_text(encoding="utf-8"))
        self.server = server
        self.sounds: list[dict] = fixture["sounds"]
        self.clips = {sid: clips[stem] for sid, stem in fixture["media"].items()}
        self.api = server.url + "/apiv2"
        server.add_handler("/apiv2/search/", self.search)
        for sid, data in self.clips.items():
            server.add(self.preview_path(sid), data, "audio/ogg")
            server.add(f"/media/originals/{sid}.ogg", data, "application/octet-stream")
            server.add_handler(f"/apiv2/sounds/{sid}/download/", self.download)

    @staticmethod
    def preview_path(sid: str | int) -> str:
        return f"/previews/{sid}-hq.ogg"

    def record(self, sound: dict, wanted: list[str]) -> dict:
        sid = sound["id"]
        full = {**sound, "previews": {
            "preview-hq-ogg": self.server.url + self.preview_path(sid),
            "preview-lq-ogg": self.server.url + f"/previews/{sid}-lq.ogg",
            "preview-hq-mp3": self.server.url + f"/previews/{sid}-hq.mp3",
            "preview-lq-mp3": self.server.url + f"/previews/{sid}-lq.mp3",
        }}
        return {k: full[k] for k in wanted if k in full}

    def search(self, request: Request) -> Response:
        if request.query.get("token") != API_KEY:
            return Response.json({"detail": "Invalid token."}, status=401)
        query = request.query.get("query", "").lower()
        hits = [s for s in self.sounds
                if not query or query in (s["name"] + " " + s["description"] + " " + " ".join(s["tags"])).lower()]
        size = int(request.query.get("page_size", 15))
        page = int(request.query.get("page", 1))
        pages = max(1, math.ceil(len(hits) / size))
        if page > pages:
            return Response.json({"detail": "Invalid page."}, status=404)
        wanted = request.query.get("fields", "id,name,tags,username,license").split(",")
        nxt = f"{self.api}/search/?page={page + 1}&page_size={size}&query={query}" if page < pages else None
        return Response.json({"count": len(hits), "next": nxt, "previous": None,
                              "results": [self.record(s, wanted) for s in hits[(page - 1) * size: page * size]]})

    def download(self, request: Request) -> Response:
        if request.header("Authorization") != f"Bearer {OAUTH}":
            return Response.json({"detail": "Authentication credentials were not provided."}, status=401)
        sid = request.path.split("/")[-3]
        # Freesound answers with a redirect to the file.
        return Response(302, b"", "text/html", {"Location": self.server.url + f"/media/originals/{sid}.ogg"})

    def page_requests(self) -> list[int]:
        return [int(r.query["page"]) for r in self.server.requests_to("/apiv2/search/")]


@pytest.fixture
def api(loopback, real_clips, monkeypatch) -> FakeFreesound:
    monkeypatch.setenv("FREESOUND_API_KEY", API_KEY)
    monkeypatch.delenv("FREESOUND_OAUTH_TOKEN", raising=False)
    return FakeFreesound(loopback, real_clips)


def _source(api: FakeFreesound, tmp_path: Path | None = None, **options: str):
    config = SourceConfig(base_url=api.api, options={**FAST, **options}, state_dir=tmp_path)
    return load_source("freesound", config)


# -- captions -----------------------------------------------------------------------------------

def test_captions_follow_laions_recipe():
    assert clean_title("Dog_Bark_Loud.wav") == "Dog Bark Loud"
    assert first_sentence("<b>Recorded</b> at 3.5 m &amp; 48 kHz. Second sentence.") == "Recorded at 3.5 m & 48 kHz."
    assert captions("Door_creak.wav", "An old door creaks open. Zoom H6.") == ["Door creak.", "An old door creaks open."]
    assert captions("rain", "") == ["rain."]


# -- listing and fetching -----------------------------------------------------------------------

def test_lists_every_page_with_captions_tags_and_ids(api, tmp_path):
    items = list(_source(api, tmp_path, page_size="4").list_items())
    assert [i.source_id for i in items] == [str(s["id"]) for s in api.sounds]
    assert api.page_requests() == [1, 2, 3]
    first = api.server.requests_to("/apiv2/search/")[0]
    assert first.query["fields"] == FIELDS and first.query["page_size"] == "4"
    robin = next(i for i in items if i.source_id == "456440")
    assert robin.text == ["Bird Whistling, Robin, Single, 13.", "Bird Whistling, Robin, Single, 13.wav / InspectorJ A single "
                          "chirping call of an English robin bird."]
    assert robin.tag == ["bird", "robin", "chirp"]
    assert robin.author == "InspectorJ" and robin.license == "http://creativecommons.org/licenses/by/3.0/"
    assert robin.locator.endswith("/previews/456440-hq.ogg")
    assert "previews" not in robin.original_data and robin.original_data["duration"] > 0
    assert API_KEY not in json.dumps([i.to_json() for i in items])


def test_a_limited_listing_fetches_only_the_pages_it_needs(api, tmp_path):
    import itertools

    items = list(itertools.islice(_source(api, tmp_path, page_size="2").list_items(), 3))
    assert len(items) == 3 and api.page_requests() == [1, 2]


def test_query_is_sent(api, tmp_path):
    items = list(_source(api, tmp_path, query="robin").list_items())
    assert [i.source_id for i in items] == ["456440"]
    assert api.server.requests_to("/apiv2/search/")[0].query["query"] == "robin"


def test_fetch_preview_sends_no_credentials(api, tmp_path, real_clips):
    source = _source(api, tmp_path, query="robin")
    item = next(source.list_items())
    assert source.fetch(item) == real_clips["456440__inspectorj__bird-whistling-robin-single-13"]
    preview = api.server.requests_to("/previews/456440-hq.ogg")[0]
    assert preview.header("Authorization") is None and "token" not in preview.query


def test_fetch_original_with_oauth(api, tmp_path, real_clips, monkeypatch):
    monkeypatch.setenv("FREESOUND_OAUTH_TOKEN", OAUTH)
    source = _source(api, tmp_path, query="robin", download="original")
    item = next(source.list_items())
    assert item.locator == f"{api.api}/sounds/456440/download/"
    assert source.fetch(item) == real_clips["456440__inspectorj__bird-whistling-robin-single-13"]


def test_bad_oauth_token_stops_the_source(api, tmp_path, monkeypatch):
    monkeypatch.setenv("FREESOUND_OAUTH_TOKEN", "wrong-token-value")
    source = _source(api, tmp_path, query="robin", download="original")
    item = next(source.list_items())
    with pytest.raises(SourceError, match="FREESOUND_OAUTH_TOKEN") as info:
        source.fetch(item)
    assert "wrong-token-value" not in str(info.value)


def test_missing_key_is_a_user_error(api, tmp_path, monkeypatch):
    monkeypatch.delenv("FREESOUND_API_KEY")
    with pytest.raises(UserError, match="FREESOUND_API_KEY"):
        _source(api, tmp_path).check()
    monkeypatch.setenv("FREESOUND_API_KEY", API_KEY)
    with pytest.raises(UserError, match="FREESOUND_OAUTH_TOKEN"):
        _source(api, tmp_path, download="original").check()


def test_bad_api_key_stops_with_one_message(api, tmp_path, monkeypatch):
    monkeypatch.setenv("FREESOUND_API_KEY", "not-the-key-xyz")
    with pytest.raises(SourceError, match="rejected the credentials") as info:
        list(_source(api, tmp_path).list_items())
    assert "not-the-key-xyz" not in str(info.value)
    assert len(api.server.requests_to("/apiv2/search/")) == 1


@pytest.mark.parametrize("bad", [{"page_size": "151"}, {"page_size": "x"}, {"download": "zip"}, {"colour": "red"},
                                 {"http_retries": "many"}, {"preview": "preview-hq-wav"}])
def test_bad_options_are_user_errors(api, bad):
    with pytest.raises(UserError):
        _source(api, None, **bad)


def test_fetch_faults_become_named_item_errors(api, tmp_path):
    source = _source(api, tmp_path, http_max_bytes=str(2**20))
    items = {i.source_id: i for i in source.list_items()}
    cases = {"147793": ("404", {}, "http_404"), "900001": ("html", {}, "not_audio_content"),
             "900002": ("truncate", {}, "truncated_body"), "456440": ("stall", {"seconds": 2.0}, "stalled"),
             "900003": ("oversize", {"size": 3 * 2**20}, "too_large")}
    for sid, (kind, extra, _) in cases.items():
        api.server.fault(api.preview_path(sid), kind, times=None, **extra)
    for sid, (_, _, reason) in cases.items():
        with pytest.raises(ItemError) as info:
            source.fetch(items[sid])
        assert info.value.reason == reason, sid


# -- listing resume -----------------------------------------------------------------------------

def test_malformed_page_stops_then_the_rerun_resumes_there(api, tmp_path):
    # Page 2 is cut off (every try); pages 1 and 3 are fine.
    original = api.search
    broken = {"on": True}

    def search(request: Request) -> Response:
        if broken["on"] and request.query.get("page") == "2":
            return Response(200, b'{"count": 10, "next": "x", "results": [{"id": 9', "application/json")
        return original(request)

    api.server.add_handler("/apiv2/search/", search)
    with pytest.raises(SourceError, match="page 2 is malformed.*resumes at page 2"):
        list(_source(api, tmp_path, page_size="4").list_items())
    assert api.page_requests() == [1, 2, 2, 2]

    broken["on"] = False
    items = list(_source(api, tmp_path, page_size="4").list_items())
    assert len(items) == len(api.sounds)
    assert api.page_requests() == [1, 2, 2, 2, 2, 3]  # page 1 was not fetched again


def test_quota_429_stops_the_listing_and_resumes_later(api, tmp_path):
    api.server.add_handler("/apiv2/search/", _fail_page(api.search, page="3", status=429, retry_after="3600"))
    with pytest.raises(SourceError, match="rate limit"):
        list(_source(api, tmp_path, page_size="4").list_items())
    api.server.add_handler("/apiv2/search/", api.search)
    assert len(list(_source(api, tmp_path, page_size="4").list_items())) == len(api.sounds)
    assert api.page_requests() == [1, 2, 3, 3]


def _fail_page(handler, page: str, status: int, retry_after: str):
    def search(request: Request) -> Response:
        if request.query.get("page") == page:
            return Response(status, b'{"detail": "Request was throttled."}', "application/json",
                            {"Retry-After": retry_after})
        return handler(request)
    return search


def test_definition_ships_the_esc50_exclusions():
    from audio_dataset.build import definition_exclusions, read_exclusions
    from audio_dataset.source import read_definition

    definition = read_definition("freesound")
    assert definition["paper_clips"] == 414127 and definition["env"] == ["FREESOUND_API_KEY", "FREESOUND_OAUTH_TOKEN"]
    ids = read_exclusions(definition_exclusions("freesound"))
    assert {"100032", "137"} <= ids  # ESC-50 clips 1-100032-A (dog) and 1-137-A (keyboard typing)
    assert not ids & {str(s["id"]) for s in json.loads((FIXTURES / "sounds.json").read_text())["sounds"]}


def test_rate_limit_defaults_to_freesounds_documented_limit():
    source = load_source("freesound", SourceConfig())
    assert source.client.host_rates == {"freesound.org": 1.0}
    assert source.api == "https://freesound.org/apiv2"


# -- end to end: `audiodata build` through the loopback API ---------------------------------------

@pytest.mark.usefixtures("ray_local")
def test_build_with_faults_ends_in_exact_outcomes(api, tmp_path):
    from web_source_helpers import run_build, samples, status_counts

    faults = {"147793": ("404", {}), "900001": ("500", {"times": 2}), "900002": ("429", {"retry_after": "0.2"}),
              "456440": ("stall", {"times": None, "seconds": 2.0}), "900003": ("truncate", {"times": None}),
              "900004": ("html", {"times": None}), "900005": ("oversize", {"times": None, "size": 3 * 2**20})}
    for sid, (kind, extra) in faults.items():
        api.server.fault(api.preview_path(sid), kind, **{"times": 1, **extra})
    exclude = tmp_path / "eval_overlap.txt"
    exclude.write_text("# ids used by an evaluation set\n900008\n")
    out = tmp_path / "out"
    rows = run_build("freesound", out, base_url=api.api, exclude=[exclude],
                     options={**FAST, "page_size": "4", "http_max_bytes": str(2**20)})

    assert status_counts(rows) == {"ok": 4, "failed": 5, "excluded": 1}
    assert {sid: rows[sid]["error"] for sid in rows if rows[sid]["status"] == "failed"} == {
        "147793": "http_404", "456440": "stalled", "900003": "truncated_body",
        "900004": "not_audio_content", "900005": "too_large"}
    assert {sid for sid in rows if rows[sid]["status"] == "ok"} == {"900001", "900002", "900006", "900007"}
    assert len(api.server.requests_to(api.preview_path("900001"))) == 3  # two 500s, then the file
    assert not api.server.requests_to(api.preview_path("900008"))  # excluded items are never fetched

    built = samples(out)
    assert set(built) == {"900001", "900002", "900006", "900007"}
    meta = built["900006"]
    record = next(s for s in api.sounds if s["id"] == 900006)
    assert meta["source"] == "freesound" and meta["tag"] == record["tags"]
    assert meta["text"] == captions(record["name"], record["description"])
    assert meta["author"] == record["username"] and meta["license"] == record["license"]
    assert meta["original_data"]["id"] == 900006
    manifest_text = (out / "manifest.parquet").read_bytes()
    assert API_KEY.encode() not in manifest_text


@pytest.mark.usefixtures("ray_local")
def test_build_resumes_an_interrupted_listing_and_keeps_its_index(api, tmp_path):
    from web_source_helpers import run_build, status_counts

    api.server.add_handler("/apiv2/search/", _fail_page(api.search, page="2", status=429, retry_after="86400"))
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="rate limit"):
        run_build("freesound", out, base_url=api.api, options={**FAST, "page_size": "4"})
    assert api.page_requests() == [1, 2]

    api.server.add_handler("/apiv2/search/", api.search)
    rows = run_build("freesound", out, base_url=api.api, options={**FAST, "page_size": "4"})
    assert status_counts(rows) == {"ok": len(api.sounds)}
    assert api.page_requests() == [1, 2, 2, 3]  # resumed at page 2
    # A rebuild reads the cached index: no listing request at all.
    run_build("freesound", out, base_url=api.api, options={**FAST, "page_size": "4"})
    assert api.page_requests() == [1, 2, 2, 3]


def test_cli_bad_token_is_one_line_and_exit_1(api, tmp_path, monkeypatch):
    import subprocess
    import sys

    env = {**__import__("os").environ, "FREESOUND_API_KEY": "wrong-key-1234"}
    result = subprocess.run([sys.executable, "-m", "audio_dataset.cli", "build", "--source", "freesound",
                             "--base-url", api.api, "--out", str(tmp_path / "out"), "--no-progress",
                             "--source-option", "query=dog"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"audiodata: source failed: 127.0.0.1:{api.server.port} rejected the credentials "
                     "(HTTP 401); check $FREESOUND_API_KEY"]
    assert "wrong-key-1234" not in result.stdout + result.stderr
