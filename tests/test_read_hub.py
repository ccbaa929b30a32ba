"""The online hub path: a dataset downloaded through huggingface_hub from a small local stand-in for the hub
(the few endpoints snapshot_download uses), then read like any local copy. No network is touched."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms import datasets
from transforms.datasets import resolve_dataset
from transforms.read import ReadTasks

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROW = {"examples": [[[[1]], [[2]]], [[[3]], [[4]]], [[[5]], [[6]]]], "source": "def f(): pass", "seeds": []}
FILES = {
    "data_100k.jsonl": (json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n").encode(),
    "README.md": b"# not data, never downloaded",
}


class FakeHub(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _json(self, value):
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, with_body: bool):
        name = self.path.split("/resolve/", 1)[1].split("/", 1)[1]
        if name not in FILES:
            self.send_response(404)
            self.end_headers()
            return
        data = FILES[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._file(with_body=False)

    def do_GET(self):
        if "/tree/" in self.path:
            self._json([{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in FILES.items()])
        elif self.path.startswith("/api/datasets/someone/barc-like"):
            self._json({"id": "someone/barc-like", "sha": COMMIT, "siblings": [{"rfilename": n} for n in FILES]})
        elif self.path.startswith("/api/"):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
        else:
            self._file(with_body=True)


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_hub_dataset_is_downloaded_then_read(online_hub):
    source = resolve_dataset("someone/barc-like", hub_endpoint=online_hub)
    assert (source.kind, source.dataset, source.file_format) == (datasets.BARC, "someone/barc-like", "jsonl")
    assert [path.rsplit("/", 1)[1] for path in source.files] == ["data_100k.jsonl"]  # README not fetched

    pipeline = BeamTestPipeline(runner=FnApiRunner())
    result = pipeline | ReadTasks(source)
    line = len(FILES["data_100k.jsonl"]) // 2
    # Two identical rows, two ids.
    assert_that(result.main | beam.Map(lambda t: (t["record_id"], t["dataset"], len(t["train"]))),
                equal_to([("data_100k:0", "someone/barc-like", 2), (f"data_100k:{line}", "someone/barc-like", 2)]))
    pipeline.run().wait_until_finish()


def test_unknown_hub_dataset_says_so(online_hub):
    with pytest.raises(datasets.DatasetUnavailableError, match="no such dataset on the Hugging Face hub"):
        resolve_dataset("someone/missing", hub_endpoint=online_hub)
