"""Secrets never land in a message or a file: a server echoing the token back in a 200 body, and a
password in --base-url. The build runs as the user runs it (`audiodata` in its own process, its own
Ray) against a loopback Freesound; every file under OUT, stderr, `failures` and the report are read."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audio_dataset.http import _quote, public_url
from audio_dataset.redaction import MIN_RUN, redact, request_secrets, scrub
from loopback import Request, Response
from test_source_freesound import API_KEY, FAST, FakeFreesound

ROOT = Path(__file__).parents[2]
OAUTH = "Q9x2Lm4Zp8Rt6Wv3Yb5Nc1Kd0Hj7Gf"
PASSWORD = "Pw7hunter2XyZq"


def _leaks(text: str, secret: str) -> bool:
    """The secret, or any run of MIN_RUN of its characters, in `text`."""
    return any(secret[i:i + MIN_RUN] in text for i in range(len(secret) - MIN_RUN + 1))


def _file_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".parquet":  # compressed pages: read the values, not the bytes
        return str(pq.read_table(path).to_pylist())
    return data.decode("latin-1")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audio_dataset.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREESOUND_")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FREESOUND_API_KEY": API_KEY, **extra}


def _options() -> list[str]:
    return [arg for key, value in {**FAST, "download": "original", "page_size": "4"}.items()
            for arg in ("--source-option", f"{key}={value}")]


@pytest.fixture
def echoing(loopback, real_clips) -> FakeFreesound:
    """Freesound whose download endpoint answers some sounds with a 200 that quotes the credentials:
    the whole token, the token cut by the 16-byte quote, and the API key (sent only to the search)."""
    api = FakeFreesound(loopback, real_clips)
    sids = sorted(api.clips)
    bodies = {sids[0]: OAUTH.encode() + b" is your token", sids[1]: b"you are: " + OAUTH.encode(),
              sids[2]: API_KEY.encode() + b" was the key"}

    def download(request: Request) -> Response:
        sid = request.path.split("/")[-3]
        if sid in bodies:
            return Response(200, bodies[sid], "text/plain" if sid != sids[1] else "application/octet-stream")
        if request.header("Authorization") != f"Bearer {OAUTH}":
            return Response.json({"detail": "no credentials"}, status=401)
        return Response(302, b"", "text/html", {"Location": loopback.url + f"/media/originals/{sid}.ogg"})

    for sid in sids:
        loopback.add_handler(f"/apiv2/sounds/{sid}/download/", download)
    api.echoed = sorted(bodies)  # type: ignore[attr-defined]
    return api


def test_an_echoed_token_reaches_no_message_or_file(echoing, tmp_path):
    out = tmp_path / "out"
    env = _env(FREESOUND_OAUTH_TOKEN=OAUTH)
    built = _cli("build", "--source", "freesound", "--base-url", echoing.api, "--out", str(out), "--no-progress",
                 "--workers", "1", "--splits", "train=1", *_options(), env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    rows = {row["source_id"]: row for row in pq.read_table(out / "manifest.parquet").to_pylist()}
    for sid in echoing.echoed:  # the items failed for the named reason, their detail still says what came
        assert rows[sid]["error"] == "not_audio_content" and "***" in rows[sid]["error_detail"], rows[sid]
    assert sum(row["status"] == "ok" for row in rows.values()) >= 3
    failures = _cli("failures", str(out), env=env)
    report = _cli("report", str(out), env=env)
    assert failures.returncode == 0 and report.returncode == 0, failures.stderr + report.stderr
    assert all(sid in failures.stdout for sid in echoing.echoed)
    texts = {"build stderr": built.stderr + built.stdout, "failures": failures.stdout + failures.stderr,
             "report stderr": report.stderr}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert out / "report.html" in files and any("_work" in p.parts for p in files)
    texts |= {str(p.relative_to(out)): _file_text(p) for p in files}
    for secret in (OAUTH, API_KEY):
        leaked = [name for name, text in texts.items() if _leaks(text, secret)]
        assert not leaked, f"{secret[:4]}... in {leaked}"


@pytest.mark.parametrize("source", ["freesound", "bbc_sound_effects"])
def test_a_password_in_base_url_is_refused_before_any_request(loopback, tmp_path, source):
    """Userinfo would replace the API's own header with Basic (requests does that) and ride in every
    item URL into _work and the manifest: refused in one line, nothing sent, nothing written."""
    out = tmp_path / "out"
    base = loopback.url.replace("http://", f"http://someone:{PASSWORD}@") + "/apiv2"
    result = _cli("build", "--source", source, "--base-url", base, "--out", str(out), "--no-progress",
                  "--workers", "1", env=_env(FREESOUND_OAUTH_TOKEN=OAUTH))
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and "--base-url must not carry user:password" in err[0], err
    assert not _leaks(result.stderr + result.stdout, PASSWORD)
    assert loopback.log == []  # no request at all, so no Basic header in place of the key
    assert not any(_leaks(_file_text(p), PASSWORD) for p in tmp_path.rglob("*") if p.is_file())


def test_urls_in_messages_lose_their_userinfo_and_query():
    assert public_url(f"https://someone:{PASSWORD}@host:8443/a/b?token=t") == "https://host:8443/a/b"
    assert redact(f"see s3://key:{PASSWORD}@bucket/x and https://h/?token=abcd") == \
        "see s3://***@bucket/x and https://h/?token=***"


def test_a_quote_loses_every_secret_of_the_request_whole_or_cut():
    secrets = request_secrets("http://h/x?page=2&token=QueryTok3n99", {"Authorization": f"Bearer {OAUTH}",
                                                                      "Cookie": "a=1; session=S3ss10nV4lu3"})
    assert {OAUTH, "QueryTok3n99", "S3ss10nV4lu3"} <= set(secrets) and "2" not in secrets
    assert _quote(OAUTH.encode(), secrets) == "b'***'"
    assert _quote(b"0123456789" + OAUTH.encode(), secrets) == "b'0123456789***'"  # the token's first 6 bytes
    assert _quote(b"<html><body>Oops", secrets) == "b'<html><body>Oops'"  # ordinary text stays readable
    assert scrub(f"x {OAUTH[5:17]} y", [OAUTH]) == "x *** y"  # a run of it, not only the whole


def test_the_runs_own_credentials_are_scrubbed_from_any_message(monkeypatch):
    monkeypatch.setenv("EPIDEMIC_SOUND_COOKIE", "sessionid=C00kieV4lueXYZ")
    assert "C00kieV4" not in redact("the site said: sessionid=C00kieV4lueXYZ is expired")
