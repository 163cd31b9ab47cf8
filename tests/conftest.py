"""Test-wide environment: offline hubs, caches inside the project, quiet Ray; an S3 server for storage tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf"))
os.environ.setdefault("HF_DATASETS_CACHE", str(ROOT / ".cache" / "hf" / "datasets"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest (and stay fast on a busy 2-core machine) with one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class S3:
    """A fresh bucket on the session's S3 server, with the client's environment set for the test."""

    server: S3Server
    bucket: str

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"

    def files(self, path: str) -> list[str]:
        return self.server.files(f"{self.bucket}/{path}")

    def read(self, path: str) -> bytes:
        return self.server.read(f"{self.bucket}/{path}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """SeaweedFS's S3 gateway on 127.0.0.1 for the whole session (tests/s3_server.py); stopped at the end."""
    server = S3Server.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch) -> S3:
    """A new bucket, with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION set to reach it."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return S3(s3_server, s3_server.create_bucket())
