"""`audiodata verify OUT`: open every shard, decode every sample, check JSON, sizes.json, each shard's
sha256 (SHA256SUMS, recorded when the shard was written) and the manifest."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import soundfile
from upath import UPath

from audio_dataset import manifest
from audio_dataset.build import CONFIG_FILE, WORK_DIR
from audio_dataset.licenses import needs_attribution, sample_licence
from audio_dataset.schema import SIZES_FILE, SampleRefused, load_json_object, validate_meta
from audio_dataset.shards import CHECKSUMS_FILE, DamagedShard, file_sha256, iter_shard, read_checksums, refusal, \
    shard_paths
from audio_dataset.storage import Location, location, read_json


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    # Found, but not a broken dataset: clips whose licence asks for credit with nothing to credit.
    warnings: list[str] = field(default_factory=list)
    _uncredited: set[tuple[Any, Any]] = field(default_factory=set, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems


def _built_audio(out: UPath) -> dict[str, Any]:
    """The audio options the build recorded (`_work/config.json`): every sample must have them, so
    a folder that two builds with other options wrote into is caught. Empty for other outputs."""
    path = out / WORK_DIR / CONFIG_FILE
    audio = read_json(path).get("audio", {}) if path.exists() else {}
    return {k: audio[k] for k in ("sample_rate", "channels") if k in audio}


def _check_sample(name: str, sample: dict, report: VerifyReport, built: dict[str, Any]) -> None:
    key = sample["__key__"]
    where = f"{name}:{key}"
    refused = refusal(sample)
    if refused is not None:
        report.problems.append(f"{where}: {refused}")
        return
    if set(sample) != {"__key__", "flac", "json"}:
        report.problems.append(f"{where}: members {sorted(k for k in sample if k != '__key__')}, want flac+json")
        return
    try:
        meta = load_json_object(sample["json"])
    except SampleRefused as exc:
        report.problems.append(f"{where}: {exc}")
        return
    report.problems.extend(f"{where}: {p}" for p in validate_meta(meta))
    _check_credit(where, meta, report)
    report.problems.extend(f"{where}: JSON {option} {meta.get(option)}, the build's options say {value}"
                           for option, value in built.items() if meta.get(option) != value)
    try:
        frames, rate, channels = _decode_flac(sample["flac"])
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        report.problems.append(f"{where}: FLAC does not decode ({exc})")
        return
    if rate != meta.get("sample_rate"):
        report.problems.append(f"{where}: FLAC rate {rate} != JSON sample_rate {meta.get('sample_rate')}")
    if channels != meta.get("channels"):
        report.problems.append(f"{where}: FLAC has {channels} channels, JSON says {meta.get('channels')}")
    duration = frames / rate
    claimed = meta.get("duration")
    if not isinstance(claimed, (int, float)) or abs(duration - float(claimed)) > 0.01:
        report.problems.append(f"{where}: FLAC lasts {duration:.3f}s, JSON says {meta.get('duration')}")


def _check_credit(where: str, meta: dict[str, Any], report: VerifyReport) -> None:
    """A clip whose licence asks for attribution needs an author or a URL (`audiodata attribution`)."""
    licence_id, _ = sample_licence(meta)
    if not needs_attribution(licence_id):
        return
    if any(isinstance(meta.get(name), str) and meta[name].strip() for name in ("author", "url")):
        return
    clip = (meta.get("source"), meta.get("source_id"))
    clip = clip if all(isinstance(part, str) for part in clip) else (where, None)
    if clip not in report._uncredited:  # one line per clip, not per segment
        report._uncredited.add(clip)
        report.warnings.append(f"{where}: licence {licence_id} asks for attribution, but the clip has no author or url")


def _decode_flac(data: bytes) -> tuple[int, int, int]:
    """(frames, rate, channels), decoding every frame a block at a time: memory stays flat however
    long the audio a small FLAC (of silence, say) declares."""
    with soundfile.SoundFile(io.BytesIO(data)) as handle:
        frames = sum(len(block) for block in handle.blocks(blocksize=1 << 16, dtype="int16", always_2d=True))
        return frames, handle.samplerate, handle.channels


def _check_checksum(name: str, path: UPath, sums: dict[str, str] | None, report: VerifyReport) -> None:
    if sums is None:
        return
    if path.name not in sums:
        report.problems.append(f"{name}: not in {CHECKSUMS_FILE}")
        return
    try:
        digest = file_sha256(path)
    except OSError:  # reported when the shard is read
        return
    if digest != sums[path.name]:
        report.problems.append(f"{name}: sha256 differs from {CHECKSUMS_FILE}: changed after it was written")


def _check_split(out: UPath, split: str, report: VerifyReport, built: dict[str, Any]) -> dict[str, set[str]]:
    """Verify one split's shards; returns shard name -> keys found."""
    split_dir = out / split
    found: dict[str, set[str]] = {}
    sizes_path = split_dir / SIZES_FILE
    sizes = read_json(sizes_path) if sizes_path.exists() else None
    paths = shard_paths(split_dir)
    if paths and sizes is None:
        report.problems.append(f"{split}: {SIZES_FILE} missing")
    sums = read_checksums(split_dir)  # None for outputs written before checksums were kept
    for path in paths:
        name = f"{split}/{path.name}"
        report.shards += 1
        _check_checksum(name, path, sums, report)
        keys: list[str] = []
        try:
            for sample in iter_shard(path):
                keys.append(sample["__key__"])
                _check_sample(name, sample, report, built)
        except DamagedShard as exc:
            report.problems.append(f"{name}: unreadable tar ({exc.detail})")
        except OSError as exc:
            report.problems.append(f"{name}: unreadable ({exc.strerror or exc})")
        if len(set(keys)) != len(keys):
            report.problems.append(f"{name}: duplicate keys")
        report.samples += len(keys)
        found[name] = set(keys)
        if sizes is not None and sizes.get(path.name) != len(keys):
            report.problems.append(f"{name}: {len(keys)} samples, {SIZES_FILE} says {sizes.get(path.name)}")
    if sizes is not None:
        for missing in sorted(set(sizes) - {p.name for p in paths}):
            report.problems.append(f"{split}/{missing}: listed in {SIZES_FILE} but missing")
    return found


def _check_manifest(out: UPath, found: dict[str, set[str]], report: VerifyReport) -> None:
    path = out / manifest.MANIFEST_FILE
    if not path.exists():
        report.problems.append(f"{manifest.MANIFEST_FILE} missing")
        return
    rows = manifest.read_table(path).to_pylist()
    expected: dict[str, set[str]] = {}
    ids = [(r["source"], r["source_id"]) for r in rows]
    if len(set(ids)) != len(ids):
        report.problems.append("manifest: an input appears more than once")
    for row in rows:
        if row["status"] == manifest.STATUS_OK:
            expected.setdefault(row["shard"], set()).update(row["sample_keys"])
            if row["n_samples"] != len(row["sample_keys"]) or not row["sample_keys"]:
                report.problems.append(f"manifest: {row['source_id']} n_samples disagrees with sample_keys")
        elif row["sample_keys"]:
            report.problems.append(f"manifest: {row['source_id']} is {row['status']} but lists samples")
    for shard in sorted(set(expected) | set(found)):
        want, have = expected.get(shard, set()), found.get(shard, set())
        if want - have:
            report.problems.append(f"{shard}: {len(want - have)} manifest samples missing from the shard")
        if have - want:
            report.problems.append(f"{shard}: {len(have - want)} samples not in the manifest")


def verify(out_location: Location) -> VerifyReport:
    from audio_dataset.recipe import STATUS_FILE, failed_sources

    out = location(out_location)
    report = VerifyReport()
    # A recipe source that failed has no shards to check: the dataset is short of it all the same.
    report.problems.extend(f"source {name} failed ({STATUS_FILE}): {why}" for name, why in failed_sources(out).items())
    found: dict[str, set[str]] = {}
    built = _built_audio(out)
    for split_dir in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        found.update(_check_split(out, split_dir.name, report, built))
    _check_manifest(out, found, report)
    return report
