"""`audiodata report`: the HTML page as a person sees it, rendered by headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from audio_dataset import manifest
from audio_dataset.build import BuildOptions, build
from audio_dataset.source import SourceConfig
from conftest import REAL_AUDIO_DIR

CLI = [sys.executable, "-m", "audio_dataset.cli"]
ROBIN = "456440__inspectorj__bird-whistling-robin-single-13"
HOSTILE_CAPTION = 'A robin <script>document.title="pwned"</script> chirps & <b>sings</b>'
HOSTILE_AUTHOR = "<img src=x onerror=alert(1)>InspectorJ"


def _chromium() -> str:
    found = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium")
    if not found:
        pytest.skip("Chromium not installed (apt-get install chromium)")
    return found


def _chromium_run(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           *args, page.as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class _Dom(HTMLParser):
    """What the rendered DOM holds: elements by tag with attributes, and text per element id/class."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.texts: dict[str, list[str]] = {}
        self.title = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        element = (tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if tag not in ("img", "meta", "br", "source", "link", "input"):
            self.stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for tag, attrs in self.stack:
            for name in [attrs.get("id", ""), *attrs.get("class", "").split(), tag]:
                if name:
                    self.texts.setdefault(name, []).append(data)
        if self.stack and self.stack[-1][0] == "title":
            self.title += data

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for t, attrs in self.elements if t == tag]

    def text(self, name: str) -> str:
        return "".join(self.texts.get(name, []))


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> Path:
    """The real clips with web-like metadata (one hostile) and two items that are not kept."""
    folder = tmp_path_factory.mktemp("input")
    for path in REAL_AUDIO_DIR.iterdir():
        shutil.copy(path, folder / path.name)
    sidecar = folder / f"{ROBIN}.json"
    meta = json.loads(sidecar.read_text())
    meta.update(text=HOSTILE_CAPTION, author=HOSTILE_AUTHOR, url="javascript:alert(1)")
    sidecar.write_text(json.dumps(meta))
    (folder / "notes.wav").write_bytes(b"<html>this is not audio</html>")
    soundfile.write(folder / "blip.wav", np.full(4_800, 0.1, np.float32), 48_000)
    out = tmp_path_factory.mktemp("built") / "out"
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(folder)),
                       samples_per_shard=4, workers=2, progress=False))
    return out


def test_report_renders_figures_plots_and_playable_samples(built: Path, tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "report", str(built)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = built / "report.html"
    assert result.stdout.strip() == str(page)
    source = page.read_text(encoding="utf-8")
    assert "http-equiv=\"Content-Security-Policy\"" in source and "default-src 'none'" in source
    assert "<script" not in source.replace("&lt;script", "")  # only the escaped caption mentions one

    dump = _chromium_run(page, tmp_path / "profile", "--dump-dom").stdout
    dom = _Dom()
    dom.feed(dump)
    table = manifest.read_table(built / manifest.MANIFEST_FILE)
    sizes_total = sum(sum(json.loads((built / s / "sizes.json").read_text()).values())
                      for s in ("train", "valid", "test") if (built / s / "sizes.json").exists())
    assert dom.text("samples-total") == str(sizes_total) == str(sum(table["n_samples"].to_pylist()))
    reasons = {r for r in table["error"].to_pylist() if r}
    assert reasons and all(reason in dom.text("table") for reason in reasons)
    assert "too_short" in reasons

    # Plots: four inline PNGs, each a real image.
    plots = [img for img in dom.all("img") if "plot" in img.get("class", "")]
    assert len(dom.all("img")) == len(plots) == 4
    from PIL import Image

    for img in plots:
        assert img["src"].startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert picture.size[0] > 300 and sum(1 for n in picture.convert("L").histogram() if n) > 10

    # Samples: six players whose data URIs are FLAC previews of the samples' own audio.
    audios = dom.all("audio")
    cards = [attrs for attrs in dom.all("article") if attrs.get("class") == "sample"]
    assert len(audios) == len(cards) == 6
    samples = {}
    for path in sorted(built.glob("*/*.tar")):
        from audio_dataset.shards import iter_shard

        samples.update({s["__key__"]: s for s in iter_shard(path)})
    for attrs, card in zip(audios, cards):
        assert attrs["src"].startswith("data:audio/flac;base64,")
        preview, rate = soundfile.read(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        full, full_rate = soundfile.read(io.BytesIO(samples[card["data-key"]]["flac"]))
        assert rate == 16_000 and preview.ndim == 1
        assert abs(len(preview) / rate - min(10.0, len(full) / full_rate)) < 0.01
        # The sample's own sound: its first seconds at 16 kHz, to 16-bit precision.
        expected = soxr.resample(full[: int(round(10.0 * full_rate))], full_rate, rate, quality="HQ")
        assert np.max(np.abs(preview - expected[: len(preview)])) < 1e-3
    captions = dom.text("captions")
    for card in cards:
        meta = json.loads(samples[card["data-key"]]["json"])
        assert meta["text"][0] in captions and meta["license"] in dom.text("license")

    # Web metadata is shown as text: no injected element, no script ran, no javascript: link.
    assert any(c["data-key"].startswith(f"local-{ROBIN}") for c in cards), "the robin sample is shown"
    assert HOSTILE_CAPTION in captions and HOSTILE_AUTHOR in dom.text("author")
    assert not dom.all("script") and not dom.all("b") and "pwned" not in dom.title
    assert all(not a.get("href", "").startswith("javascript") for a in dom.all("a"))
    assert "javascript:alert(1)" in dom.text("url")

    # Provenance of the build run.
    runs = json.loads((built / "provenance.json").read_text())["runs"]
    assert len(runs) == 1 and "run 1: build" in dom.text("run")
    for field in ("started_at", "finished_at", "tool_version", "command"):
        assert runs[0][field] and runs[0][field] in dom.text("run")

    # What a person sees: a rendered page, not a blank one.
    shot = tmp_path / "report.png"
    _chromium_run(page, tmp_path / "profile", "--window-size=1280,3600", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 3600)
    assert len(image.getcolors(maxcolors=1 << 20)) > 200  # text, plots, players


def test_report_to_a_chosen_path_and_to_object_storage(built: Path, tmp_path: Path) -> None:
    import fsspec

    from audio_dataset.report import write_report

    chosen = tmp_path / "pages" / "r.html"
    result = subprocess.run([*CLI, "report", str(built), "--out", str(chosen), "--samples", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(chosen) and chosen.read_text().count("<audio ") == 2

    fs = fsspec.filesystem("memory")
    fs.put(str(built), "memory://bucket/out", recursive=True)
    dest = write_report("memory://bucket/out", n_samples=1)
    assert str(dest) == "memory://bucket/out/report.html"
    page = fs.cat("memory://bucket/out/report.html").decode()
    assert page.count("<audio ") == 1 and 'id="samples-total"' in page


def test_report_on_a_folder_that_is_not_an_output(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "report", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"audiodata: error: {tmp_path} is not a build output (no manifest.parquet)"
