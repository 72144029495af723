"""Builds into and out of object storage, against a real S3 API server on loopback (moto server mode)."""
from __future__ import annotations

import pytest
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path


from conftest import BUCKET, REAL_AUDIO_DIR

CLI = [sys.executable, "-m", "audio_dataset.cli"]




def _objects(prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3")
    found = {}
    for entry in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        try:
            found[entry["Key"][len(prefix):]] = s3.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read()
        except s3.exceptions.NoSuchKey:  # gone since the listing: a running build's lock lease
            continue
    return found


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_build_to_s3_verifies_and_matches_a_local_build(tmp_path: Path, s3_env: dict[str, str]) -> None:
    common = ["build", "--source", "local", "--samples-per-shard", "4", "--workers", "2", "--no-progress"]
    # The input itself lives in the bucket too.
    import boto3

    s3 = boto3.client("s3")
    for path in sorted(REAL_AUDIO_DIR.iterdir())[:8]:
        s3.put_object(Bucket=BUCKET, Key=f"input/{path.name}", Body=path.read_bytes())
    remote = subprocess.run([*CLI, *common, "--input", f"s3://{BUCKET}/input", "--out", f"s3://{BUCKET}/out"],
                            env=s3_env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr[-2000:]
    check = subprocess.run([*CLI, "verify", f"s3://{BUCKET}/out"], env=s3_env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "4 sample(s): OK" in check.stdout

    local_input = tmp_path / "input"
    local_input.mkdir()
    for path in sorted(REAL_AUDIO_DIR.iterdir())[:8]:
        (local_input / path.name).write_bytes(path.read_bytes())
    local = subprocess.run([*CLI, *common, "--input", str(local_input), "--out", str(tmp_path / "out")],
                           env=s3_env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    objects = _objects("out/")
    tars = {k: v for k, v in objects.items() if k.endswith(".tar")}
    assert tars and tars == {str(p.relative_to(tmp_path / "out")): p.read_bytes()
                             for p in (tmp_path / "out").rglob("*.tar")}
    assert json.loads(objects["train/sizes.json"]) == json.loads((tmp_path / "out/train/sizes.json").read_text())
    assert not [k for k in objects if ".tmp-" in k], "no staging object is ever visible"
    provenance = json.loads(objects["provenance.json"])["runs"][0]
    assert f"--out s3://{BUCKET}/out" in provenance["command"]
    assert provenance["stage"] == "build" and provenance["finished_at"] >= provenance["started_at"]


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_shards_in_object_storage_are_complete_whenever_visible(s3_env: dict[str, str]) -> None:
    """Poll the bucket during a build: every .tar object that exists opens to its end."""
    proc = subprocess.Popen([*CLI, "build", "--source", "local", "--input", str(REAL_AUDIO_DIR), "--out",
                             f"s3://{BUCKET}/poll", "--samples-per-shard", "1", "--workers", "2",
                             "--no-progress"], env=s3_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checked: set[str] = set()
    import io

    while proc.poll() is None:
        for key, data in _objects("poll/").items():
            if key.endswith(".tar") and key not in checked:
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    members = tar.getmembers()
                assert members and len(members) % 2 == 0
                checked.add(key)
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert len([k for k in _objects("poll/") if k.endswith(".tar")]) == 10


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_k2c_and_clap_train_read_shards_from_s3(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """build -> s3, k2c s3 -> s3, then clap-train streams the k2c shards straight from the bucket."""
    built = subprocess.run([*CLI, "build", "--source", "local", "--input", str(REAL_AUDIO_DIR), "--out",
                            f"s3://{BUCKET}/k2c-in", "--splits", "train=1", "--samples-per-shard", "5",
                            "--max-seconds", "8", "--long-clips", "truncate", "--no-progress"],
                           env=s3_env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    k2c = subprocess.run([*CLI, "k2c", f"s3://{BUCKET}/k2c-in", "--out", f"s3://{BUCKET}/k2c-out",
                          "--caption-model", "template", "--workers", "1", "--no-progress"],
                         env=s3_env, capture_output=True, text=True, timeout=300)
    assert k2c.returncode == 0, k2c.stderr[-2000:]
    before, after = _objects("k2c-in/train/"), _objects("k2c-out/train/")
    assert sorted(before) == sorted(after) and json.loads(after["sizes.json"]) == {"000000.tar": 5, "000001.tar": 5}
    import io

    with tarfile.open(fileobj=io.BytesIO(after["000000.tar"])) as out_tar, \
            tarfile.open(fileobj=io.BytesIO(before["000000.tar"])) as in_tar:
        flac_out = {m.name: out_tar.extractfile(m).read() for m in out_tar if m.name.endswith(".flac")}
        flac_in = {m.name: in_tar.extractfile(m).read() for m in in_tar if m.name.endswith(".flac")}
        first_json = json.loads(next(out_tar.extractfile(m).read() for m in out_tar if m.name.endswith(".json")))
    assert flac_out == flac_in, "audio is copied verbatim"
    assert first_json["text_augment_all"][: len(first_json["text"])] == first_json["text"]
    runs = json.loads(_objects("k2c-out/")["provenance.json"])["runs"]
    assert [r["stage"] for r in runs] == ["build", "k2c"]

    train = subprocess.run([sys.executable, "-m", "clap_model.main",
                            "--train-data", f"s3://{BUCKET}/k2c-out/train/{{000000..000001}}.tar",
                            "--caption-fields", "text_augment_all", "--model", "tiny", "--epochs", "1",
                            "--batch-size", "4", "--workers", "0", "--max-steps", "2",
                            "--out", str(tmp_path / "ckpt")],
                           env=s3_env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert list((tmp_path / "ckpt").glob("*.pt")), "a checkpoint was written"
