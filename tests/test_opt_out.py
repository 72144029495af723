"""Opt-outs honoured by default for open-web sources: robots.txt, X-Robots-Tag and TDM-Rep against a
loopback site (the BBC source's catalogue format); --ignore-opt-out, provenance and --contact."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from audio_dataset import manifest
from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.optout import Robots, TdmRep, check_contact, user_agent, x_robots_refusal
from audio_dataset.source import ItemError, SourceError, UserError, is_open_web, read_definition
from loopback import LoopbackServer

FAST = {"http_retries": "1", "http_backoff_base": "0.01", "http_backoff_cap": "0.05", "http_stall_timeout": "2"}
CONTACT = "https://example.org/crawler-contact"
COLUMNS = '"location","description","secs","category","CDNumber","CDName","tracknum"\n'
ROBOTS = """# another bot is shut out everywhere; ours only from one file
User-agent: otherbot
Disallow: /

User-agent: audiodata
Disallow: /wav/robots_no
"""
TDMREP = [{"location": "/wav/tdm_file*", "tdm-reservation": 1, "tdm-policy": "https://example.org/policy"},
          {"location": "/wav/", "tdm-reservation": 0}]
# source id -> response headers of its WAV (what the site says about using it)
ITEMS = {
    "plain": {},
    "robots_no": {},
    "xrt_noai": {"X-Robots-Tag": "noai"},
    "xrt_none": {"X-Robots-Tag": "none"},
    "xrt_noindex": {"X-Robots-Tag": "noindex, nofollow"},
    "xrt_otherbot": {"X-Robots-Tag": "otherbot: noai, noindex"},
    "tdm_header": {"tdm-reservation": "1"},
    "tdm_file": {},
}
REFUSED = {"robots_no": "robots.txt Disallow: /wav/robots_no", "xrt_noai": "X-Robots-Tag: noai",
           "xrt_none": "X-Robots-Tag: none", "xrt_noindex": "X-Robots-Tag: noindex",
           "tdm_header": "tdm-reservation: 1", "tdm_file": "tdmrep.json tdm-reservation 1"}


@pytest.fixture
def site(loopback: LoopbackServer) -> LoopbackServer:
    from web_source_helpers import wav_bytes

    wav = wav_bytes("198-209-0000", seconds=1.0)
    rows = "".join(f'"{sid}.wav","A sound called {sid}","1","Tests","X1","Opt-outs","1"\n' for sid in ITEMS)
    loopback.add("/assets/BBCSoundEffects.csv", (COLUMNS + rows).encode(), "text/csv")
    for sid, headers in ITEMS.items():
        loopback.add(f"/wav/{sid}.wav", wav, "audio/wav", headers=headers)
    loopback.add("/robots.txt", ROBOTS.encode(), "text/plain")
    loopback.add("/.well-known/tdmrep.json", json.dumps(TDMREP).encode(), "application/json")
    return loopback


def _build(site: LoopbackServer, out: Path, ignore: bool = False) -> dict[str, dict]:
    from audio_dataset.build import BuildOptions, build
    from audio_dataset.source import SourceConfig

    config = SourceConfig(base_url=site.url, options=dict(FAST), contact=CONTACT)
    # One split, one shard, one worker: one process, so the site's policy files are fetched once.
    build(BuildOptions(source="bbc_sound_effects", out=out, source_config=config, progress=False, workers=1,
                       split_ratios={"train": 1.0}, ignore_opt_out=ignore))
    rows = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    return {row["source_id"]: row for row in rows}


def _provenance(out: Path) -> dict:
    return json.loads((out / "provenance.json").read_text())["runs"][-1]["options"]


@pytest.mark.usefixtures("ray_local")
def test_opted_out_items_are_excluded_and_named_the_rest_kept(site, tmp_path):
    rows = _build(site, tmp_path / "out")

    refused = {sid: r for sid, r in rows.items() if r["status"] == manifest.STATUS_EXCLUDED}
    assert set(refused) == set(REFUSED)
    for sid, row in refused.items():
        assert row["error"] == "opted_out" and REFUSED[sid] in row["error_detail"], row
        assert row["n_samples"] == 0 and row["sample_keys"] == []
    # robots.txt for another bot only, X-Robots-Tag scoped to another bot, tdmrep location 0: kept
    assert {sid for sid, r in rows.items() if r["status"] == "ok"} == {"plain", "xrt_otherbot"}
    # robots.txt is checked before the download: the refused file is never requested
    assert site.requests_to("/wav/robots_no.wav") == []
    # fetched once per host by the worker, though 16 fetches run in parallel
    assert len(site.requests_to("/robots.txt")) == 1
    assert len(site.requests_to("/.well-known/tdmrep.json")) == 1
    # every request names the tool and the --contact
    agents = {r.header("User-Agent") for r in site.log}
    assert agents == {user_agent(CONTACT)} and CONTACT in user_agent(CONTACT)
    assert user_agent(CONTACT).startswith("audiodata/")
    assert _provenance(tmp_path / "out")["opt_outs"] == "honoured"
    assert _provenance(tmp_path / "out")["contact"] == CONTACT


@pytest.mark.usefixtures("ray_local")
def test_ignore_opt_out_keeps_everything_and_is_recorded(site, tmp_path):
    out = tmp_path / "out"
    rows = _build(site, out, ignore=True)

    assert {r["status"] for r in rows.values()} == {"ok"} and len(rows) == len(ITEMS)
    assert _provenance(out)["opt_outs"] == "ignored"
    assert site.requests_to("/robots.txt") == []
    # resuming it while honouring opt-outs would mix two datasets: refused, named
    with pytest.raises(UserError, match="opt_outs was"):
        _build(site, out)


# ------------------------------------------------------------------ the client, without a build


def _client(**config) -> HttpClient:
    fast = dict(retries=1, backoff_base=0.01, backoff_cap=0.02, stall_timeout=2.0)
    return HttpClient(HttpConfig(honour_opt_outs=True, **{**fast, **config}))


def test_robots_404_allows_and_503_refuses_naming_it(loopback, real_clips, monkeypatch):
    clip = real_clips["198-209-0000"]
    url = loopback.add("/a.ogg", clip, "audio/ogg")
    assert _client().get_bytes(url) == clip  # no robots.txt: a 404 allows all

    with LoopbackServer() as down:
        down.add("/robots.txt", b"", "text/plain")
        down.fault("/robots.txt", "503", times=None)
        media = down.add("/a.ogg", clip, "audio/ogg")
        with pytest.raises(ItemError) as caught:
            _client().get_bytes(media)
        assert caught.value.reason == "opted_out"
        assert "robots.txt unreachable" in caught.value.detail and "503" in caught.value.detail
        assert down.requests_to("/a.ogg") == []
        with pytest.raises(ItemError, match="robots.txt unreachable"):  # cached: asked once
            _client().get_bytes(media)
        assert len(down.requests_to("/robots.txt")) == 2  # one fetch: two attempts (retries=1)
        # a failure is kept briefly: once it has aged, the next item asks again and the site is back
        from audio_dataset import http

        monkeypatch.setattr(http._PolicyCache, "FAILURE_TTL", 0.0)
        down.clear_faults("/robots.txt")
        assert _client().get_bytes(media) == clip


def test_not_honoured_fetches_without_asking(loopback, real_clips):
    clip = real_clips["198-209-0000"]
    loopback.add("/robots.txt", b"User-agent: *\nDisallow: /\n", "text/plain")
    url = loopback.add("/a.ogg", clip, "audio/ogg", headers={"X-Robots-Tag": "noai"})
    assert HttpClient(HttpConfig(retries=0)).get_bytes(url) == clip
    assert loopback.requests_to("/robots.txt") == []
    # listings and catalogues (get_text/get_json) are not items: never refused
    assert _client().get_text(loopback.url + "/robots.txt").startswith("User-agent")
    with pytest.raises(ItemError, match="Disallow: /"):
        _client().get_bytes(url)


def test_a_site_that_is_down_still_stops_the_source(loopback):
    """robots.txt failing on a dead host is the host's failure too: after max_consecutive_failures
    requests the source stops (as any fetch would), rather than quietly excluding everything."""
    loopback.fault("/robots.txt", "reset", times=None)
    client = _client(max_consecutive_failures=1, retries=0)
    with pytest.raises(SourceError, match="looks down"):
        client.get_bytes(loopback.url + "/a.ogg")


# ------------------------------------------------------------------ parsing


def test_robots_rules_follow_rfc_9309():
    robots = Robots.parse("User-agent: *\nDisallow: /private\n\n"
                          "User-agent: AudioData\nUser-agent: other\nDisallow: /sfx\nAllow: /sfx/free\n"
                          "Disallow: /*.mp3$\nDisallow:\n")
    refuse = robots.refusal
    assert refuse("audiodata", "/sfx/a.wav") and not refuse("audiodata", "/sfx/free/a.wav")  # longest wins
    assert refuse("audiodata", "/x/a.mp3") and not refuse("audiodata", "/x/a.mp3?v=1")  # * and $
    assert not refuse("audiodata", "/private/a.wav")  # our group replaces the * group
    assert refuse("somebot", "/private/a.wav") and not refuse("somebot", "/sfx/a.wav")
    assert not refuse("audiodata", "/robots.txt")
    tie = Robots.parse("User-agent: *\nDisallow: /a\nAllow: /a\n")
    assert not tie.refusal("audiodata", "/a/b")  # equal length: Allow wins
    assert not Robots.parse("").refusal("audiodata", "/anything")


def test_a_hostile_pattern_costs_bounded_time():
    """`/*a*a*...*b` against a long run of `a` makes a backtracking regex run for ever; here it
    is a bounded scan, and rules past the caps are not kept."""
    import time

    from audio_dataset.optout import MAX_RULES, path_matches

    started = time.monotonic()
    assert not path_matches("/" + "*a" * 100 + "b", "/" + "a" * 1000)
    assert time.monotonic() - started < 5
    assert path_matches("/*a*b$", "/xxaxxb") and not path_matches("/*a*b$", "/xxaxxbc")
    many = Robots.parse("User-agent: *\n" + "Disallow: /x\n" * (MAX_RULES + 5) + "Disallow: /" + "y" * 600 + "\n")
    assert len(many.groups["*"]) == MAX_RULES


def test_x_robots_tag_scopes_and_directives():
    assert x_robots_refusal(["noai"], "audiodata")
    assert x_robots_refusal(["noimageai"], "audiodata")
    assert x_robots_refusal(["audiodata: none"], "audiodata")
    assert x_robots_refusal(["otherbot: noai", "noindex"], "audiodata")  # the second line is unscoped
    assert not x_robots_refusal(["otherbot: noai, noindex"], "audiodata")
    assert not x_robots_refusal(["nofollow, noarchive", "unavailable_after: 25 Jun 2010 15:00:00 PST"], "audiodata")


def test_tdmrep_longest_location_wins_and_junk_declares_nothing():
    tdm = TdmRep.parse(json.dumps([{"location": "/media/*", "tdm-reservation": 1},
                                   {"location": "/media/open/*", "tdm-reservation": 0}]))
    assert tdm.refusal("/media/a.wav") and not tdm.refusal("/media/open/a.wav") and not tdm.refusal("/b.wav")
    assert not TdmRep.parse("{not json").rules and not TdmRep.parse('{"location": "/"}').rules
    assert not TdmRep.parse(json.dumps([{"location": "/", "tdm-reservation": True}])).rules


def test_contact_is_a_url_or_address_and_header_safe():
    assert check_contact("ops@example.org") == "ops@example.org"
    for bad in ("me", "https://x.org/a b", "a@b\r\nX-Evil: 1", "https://user:pw@x.org/", "x" * 300 + "@y"):
        with pytest.raises(UserError):
            check_contact(bad)
    result = subprocess.run([sys.executable, "-m", "audio_dataset.cli", "build", "--source", "local",
                             "--out", "x", "--contact", "not a contact"], capture_output=True, text=True)
    assert result.returncode == 2 and "--contact" in result.stderr and "Traceback" not in result.stderr


def test_every_definition_declares_whether_it_is_open_web():
    from audio_dataset.source import available_sources

    for name in available_sources():
        assert isinstance(read_definition(name).get("open_web"), bool), name
    assert is_open_web("bbc_sound_effects") and is_open_web("audiostock")
    assert not is_open_web("freesound") and not is_open_web("local")  # an API with keys; local files


def test_a_recipe_run_passes_both_flags_to_every_build():
    from audio_dataset.cli import _recipe_commands, make_parser

    args = make_parser().parse_args(["build", "--recipe", "laion-audio-630k", "--out", "out",
                                     "--contact", "ops@example.org", "--ignore-opt-out"])
    free = _recipe_commands(args)[3]
    assert free["build"][:3] == ["--contact", "ops@example.org", "--ignore-opt-out"]
