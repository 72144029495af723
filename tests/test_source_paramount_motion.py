"""Paramount Motion's Odeon pack from a local .tar.gz (extracted once into the state folder)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import soundfile
from web_source_helpers import run_build, samples, status_counts, wav_bytes

from audio_dataset.source import SourceConfig, UserError
from pipelines.paramount_motion import ParamountMotion

PACK = "Paramount Motion - Odeon Cinematic Sound Effects Pack"
ORCHESTRA = "Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra)"


def silent_wav(seconds: float = 2.0, rate: int = 22050) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * rate), dtype=np.int16), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def make_pack(path):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in {
            f"{PACK}/Hits/Odeon Hit Deep Boom 01.wav": wav_bytes("glacier-bay-humpback", 3.0),
            f"{PACK}/Risers/Odeon Riser Tension.wav": wav_bytes(ORCHESTRA, 3.0),
            f"{PACK}/Risers/Odeon Riser Silent.wav": silent_wav(),
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_input_required():
    with pytest.raises(UserError, match="Paramount Motion"):
        ParamountMotion(SourceConfig()).check()


@pytest.mark.usefixtures("ray_local")
def test_paramount_motion_builds_from_a_tarball(tmp_path):
    pack = make_pack(tmp_path / "odeon.tar.gz")
    out = tmp_path / "out"
    rows = run_build("paramount_motion", out, input=str(pack))
    # The all-zero WAV is digitally silent: dropped by the quality policy, not failed.
    assert status_counts(rows) == {"ok": 2, "dropped": 1}
    assert [r["error"] for r in rows.values() if r["status"] == "dropped"] == ["silent"]
    built = {m["text"][0]: m for m in samples(out).values()}
    assert set(built) == {"Odeon Hit Deep Boom", "Odeon Riser Tension"}
    assert built["Odeon Riser Tension"]["tag"] == [
        "odeon", "Paramount Motion Odeon Cinematic Sound Effects Pack", "Risers"]
