"""Wang (2003) landmark fingerprints and the exact PCM hash on the real clips: re-encodes, resamples,
gain changes, trims and mono/stereo copies of each clip are found, distinct clips are not."""
from __future__ import annotations

import hashlib
import io
import itertools

import numpy as np
import pytest
import soundfile

from audio_dataset.audio import decode
from audio_dataset.curate import fingerprint as fp
from audio_dataset.curate.dedup import FingerprintProcessor
from audio_dataset.stage_runner import ShardJob
from conftest import REAL_AUDIO_DIR, ffmpeg_convert

SECONDS = 8.0  # each clip's first 8 s: enough landmarks, a few seconds for the whole module
VARIANTS = {  # name -> (extension, ffmpeg arguments)
    "mp3_128k": ("mp3", ["-b:a", "128k"]),
    "resampled_16k": ("wav", ["-ar", "16000"]),
    "gain_-6dB": ("flac", ["-af", "volume=-6dB"]),
    "trim_0.5s": ("flac", ["-ss", "0.5"]),
    "stereo_48k": ("flac", ["-ac", "2", "-ar", "48000"]),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[tuple[str, str], np.ndarray]:
    """(clip, variant) -> mono audio at the fingerprint rate, decoded as `dedup` decodes shards."""
    folder = tmp_path_factory.mktemp("variants")
    waves = {}
    for path in sorted(REAL_AUDIO_DIR.glob("*.ogg")):
        decoded = decode(path.read_bytes())
        original = folder / f"{path.stem}.wav"
        soundfile.write(original, decoded.samples[:, : int(SECONDS * decoded.sample_rate)].T, decoded.sample_rate)
        files = {"original": original}
        for name, (ext, args) in VARIANTS.items():
            files[name] = ffmpeg_convert(original, folder / f"{path.stem}.{name}.{ext}", "-loglevel", "quiet", *args)
        for name, file in files.items():
            got = decode(file.read_bytes())
            waves[(path.stem, name)] = fp.mono_at_rate(got.samples, got.sample_rate, fp.RATE)
    return waves


def test_variants_match_their_clip_and_distinct_clips_do_not(family):
    names = list(family)
    prints = [fp.fingerprint(family[name]) for name in names]
    found = {(m.a, m.b) for m in fp.match_all(prints)}
    same = [(a, b) for a, b in itertools.combinations(range(len(names)), 2) if names[a][0] == names[b][0]]
    distinct = [(a, b) for a, b in itertools.combinations(range(len(names)), 2) if names[a][0] != names[b][0]]
    recall = sum(pair in found for pair in same) / len(same)
    false_rate = sum(pair in found for pair in distinct) / len(distinct)
    by_variant = {v: float(np.mean([(names.index((c, "original")), names.index((c, v))) in found
                                    for c in {c for c, _ in names}])) for v in VARIANTS}
    print(f"fingerprint recall {recall:.3f} over {len(same)} same-clip pairs, false-match rate {false_rate:.4f} "
          f"over {len(distinct)} distinct pairs; original vs variant: {by_variant}")
    assert all(rate == 1.0 for rate in by_variant.values()), by_variant
    assert recall >= 0.98
    assert false_rate == 0.0


def test_a_match_reports_the_trim_offset(family):
    clip = "sorohanro_-_solo-trumpet-06"
    original, trimmed = fp.fingerprint(family[(clip, "original")]), fp.fingerprint(family[(clip, "trim_0.5s")])
    [match] = fp.match_all([original, trimmed])
    assert abs(match.offset - (-0.5 * fp.RATE / fp.HOP)) <= 1.5  # 0.5 s earlier, in hops
    assert match.score > 0.3


def test_peak_choice_moves_with_a_trim(family):
    """A trim by whole hops moves every peak by that many frames and chooses the same peaks (away
    from the clip's edges): the choice is made in a window centred on each peak, not in fixed blocks."""
    wave = family[("pibble", "original")]
    frames, bins = fp.peaks(wave)
    cut = 37  # hops
    moved_frames, moved_bins = fp.peaks(wave[cut * fp.HOP:])
    edge = fp.NEIGHBOURHOOD[1] + fp.RATE // fp.HOP  # the filter's box and the choosing window
    lo, hi = cut + edge, int(frames.max()) - edge
    inside = lambda f, b: {(x, y) for x, y in zip(f.tolist(), b.tolist()) if lo <= x < hi}
    assert inside(frames, bins) == inside(moved_frames + cut, moved_bins)
    assert len(inside(frames, bins)) > 30


def test_equal_peaks_do_not_multiply():
    """A waveform repeating every hop gives every frame the same spectrum, a plateau of equal maxima
    in time: the choice still keeps at most PEAKS_PER_SECOND in any half second."""
    period = np.random.default_rng(0).standard_normal(fp.HOP).astype(np.float32)
    wave = np.tile(period, 60 * fp.RATE // fp.HOP)
    frames, _ = fp.peaks(wave)
    half_second = fp.RATE // fp.HOP // 2
    assert len(frames) > 0
    assert max(np.searchsorted(frames, f + half_second, side="right") - i for i, f in enumerate(frames)) \
        <= fp.PEAKS_PER_SECOND
    assert len(fp.fingerprint(wave).hashes) < 60 * 4 * 2 * fp.PEAKS_PER_SECOND * 5  # keys per peak: fanout, shifts


@pytest.mark.parametrize("seconds", [0.37, 1.11, 2.9])
def test_a_trim_between_frames_keeps_most_keys(family, seconds):
    """Trims that fall between analysis frames (the worst case of one analysis) still match: one of
    the four analyses a quarter hop apart lands within an eighth of a hop."""
    wave = family[("admiralbob77_-_Choice_-_Drum-bass", "original")]
    [match] = fp.match_all([fp.fingerprint(wave), fp.fingerprint(wave[int(seconds * fp.RATE):])])
    assert abs(match.offset + seconds * fp.RATE / fp.HOP) <= 1.5
    assert match.score > 0.25, match


def test_keys_use_their_declared_bits(family):
    keys = fp.fingerprint(family[("pibble", "original")]).hashes
    assert keys.dtype == np.uint64 and len(keys) > 0
    assert int(keys.max()) < 2 ** fp.KEY_BITS and fp.KEY_BITS <= 64
    assert len(np.unique(keys >> np.uint64(fp.KEY_BITS - 8))) > 10  # the anchor's band is in the top bits


def test_groups_only_pair_the_dataset_with_the_eval_sets(family):
    clip = "pibble"
    prints = [fp.fingerprint(family[(clip, v)]) for v in ("original", "mp3_128k", "gain_-6dB")]
    assert len(fp.match_all(prints)) == 3
    # The two eval copies (group 1) match the dataset's clip (group 0), not each other.
    assert {(m.a, m.b) for m in fp.match_all(prints, np.array([0, 1, 1]))} == {(0, 1), (0, 2)}


def test_silence_and_tiny_clips_have_no_landmarks():
    assert len(fp.fingerprint(np.zeros(fp.RATE * 3, np.float32)).hashes) == 0
    assert len(fp.fingerprint(np.zeros(100, np.float32)).hashes) == 0
    assert fp.match_all([fp.fingerprint(np.zeros(100, np.float32))] * 2) == []


def _flac(samples: np.ndarray, rate: int, level: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.T, rate, format="FLAC", subtype="PCM_16", compression_level=level)
    return buffer.getvalue()


def test_the_exact_hash_is_of_the_decoded_pcm_not_the_bytes(tmp_path, robin_path):
    decoded = decode(robin_path.read_bytes())
    samples, rate = decoded.samples[:, : 3 * decoded.sample_rate], decoded.sample_rate
    fast, small = _flac(samples, rate, 0.0), _flac(samples, rate, 1.0)
    wav = tmp_path / "robin.wav"  # the FLAC's own 16-bit PCM in another container
    soundfile.write(wav, soundfile.read(io.BytesIO(fast), dtype="int16")[0], rate, subtype="PCM_16")
    mp3 = ffmpeg_convert(wav, tmp_path / "robin.mp3", "-loglevel", "quiet", "-b:a", "128k")
    members = {"flac_level0": ("flac", fast), "flac_level8": ("flac", small), "wav": ("wav", wav.read_bytes()),
               "mp3": ("mp3", mp3.read_bytes()), "empty": ("flac", b"")}
    samples_in = [{"__key__": name, ext: data, "json": b'{"source": "t", "duration": 3.0}'}
                  for name, (ext, data) in members.items()]
    rows = {r["key"]: r for r in FingerprintProcessor("cpu").process(ShardJob("train", "000000.tar", "", "", ""),
                                                                      samples_in)[1]}
    assert fast != small and rows["flac_level0"]["bytes_sha256"] == hashlib.sha256(fast).hexdigest()
    assert rows["flac_level0"]["bytes_sha256"] != rows["flac_level8"]["bytes_sha256"]
    assert rows["flac_level0"]["pcm_sha256"] == rows["flac_level8"]["pcm_sha256"] == rows["wav"]["pcm_sha256"]
    assert rows["mp3"]["pcm_sha256"] != rows["wav"]["pcm_sha256"]  # a lossy re-encode decodes differently
    assert rows["empty"]["status"] == "no_audio" and rows["empty"]["pcm_sha256"] is None
    assert rows["mp3"]["status"] == "ok" and len(rows["mp3"]["hashes"]) > 100


def test_audio_with_non_finite_samples_is_no_audio_not_an_exact_copy_of_another():
    """Two different float WAVs, each with a NaN (or inf) every 1000 samples: the resampler spread
    them over every sample, so both decoded to the same PCM digest and were linked as exact copies
    (dedup --apply would drop one); build refuses such audio as non_finite, and so does fingerprinting."""
    def wav(seed: int, bad: float) -> bytes:
        x = np.random.default_rng(seed).standard_normal((48000 * 5, 1)).astype(np.float32) * 0.1
        x[::1000] = bad
        buffer = io.BytesIO()
        soundfile.write(buffer, x, 48000, format="WAV", subtype="FLOAT")
        return buffer.getvalue()

    samples_in = [{"__key__": f"k{seed}", "wav": wav(seed, bad), "json": b'{"source": "t"}'}
                  for seed, bad in ((1, np.nan), (2, np.nan), (3, np.inf))]
    rows = FingerprintProcessor("cpu").process(ShardJob("train", "000000.tar", "", "", ""), samples_in)[1]
    assert [(r["status"], r["pcm_sha256"], len(r["hashes"])) for r in rows] == [("no_audio", None, 0)] * 3
