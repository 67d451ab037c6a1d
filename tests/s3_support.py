"""A local S3 server for the tests (moto): the bucket, what reaches it, free ports."""

from __future__ import annotations

import json
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

BUCKET = "loraflow-test"


@dataclass
class S3:
    endpoint: str
    fs: pafs.FileSystem
    recording: Path

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def keys(self, prefix: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(f"{BUCKET}/") for i in infos if i.type == pafs.FileType.File)

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{BUCKET}/{key}") as f:
            f.write(data)

    def record(self, action: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}", method="POST"))

    def recorded_writes(self) -> list[tuple[str, str, str]]:
        """(method, object key, query) of the recorded write requests (PUT and POST: multipart
        uploads), in order."""
        entries = [json.loads(line) for line in self.recording.read_text().splitlines() if line.strip()]
        return [(e["method"], *e["url"].split(f"/{BUCKET}/", 1)[1].partition("?")[::2])
                for e in entries if e["method"] in ("PUT", "POST") and f"/{BUCKET}/" in e["url"]]

    def recorded_keys(self) -> list[str]:
        return [key for _, key, _ in self.recorded_writes()]

    def recorded_requests(self) -> list[tuple[str, str]]:
        """(method, object key) of every recorded request on the bucket, in order."""
        entries = [json.loads(line) for line in self.recording.read_text().splitlines() if line.strip()]
        return [(e["method"], e["url"].split(f"/{BUCKET}/", 1)[1].partition("?")[0])
                for e in entries if f"/{BUCKET}/" in e["url"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
