"""What provenance records of a command: everything needed to rerun it, no secrets."""
from __future__ import annotations

from audio_dataset.provenance import RunRecord, redact, redact_mapping


def test_secret_options_and_url_credentials_are_masked_counts_are_not():
    argv = ["audiodata", "build", "--freesound-token", "tok-123", "--api-key=key-456",
            "--input", "s3://AKIA:sekrit@minio:9000/in", "--ray-address", "ray://user:pw@head:10001",
            "--max-new-tokens", "60", "--out", "https://example.org/out?x=1"]
    clean = redact(argv)
    text = " ".join(clean)
    for secret in ("tok-123", "key-456", "AKIA", "sekrit", "user:pw"):
        assert secret not in text
    assert "s3://***@minio:9000/in" in clean and "ray://***@head:10001" in clean
    assert clean[clean.index("--max-new-tokens") + 1] == "60"  # a count, not a token
    assert clean[-1] == "https://example.org/out?x=1"


def test_recorded_options_are_masked_too():
    options = {"input": "s3://AKIA:sekrit@minio/in", "source_options": {"api_token": "t"},
               "hf_token": "hf_x", "max_new_tokens": 60, "exclude_files": ["https://u:p@h/ids.txt"]}
    recorded = RunRecord("build", options, command=["audiodata"]).to_dict()["options"]
    assert recorded["input"] == "s3://***@minio/in" and recorded["hf_token"] == "***"
    assert recorded["max_new_tokens"] == 60 and recorded["exclude_files"] == ["https://***@h/ids.txt"]
    assert redact_mapping({"password": "x", "path": "/data"}) == {"password": "***", "path": "/data"}
