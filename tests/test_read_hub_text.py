"""`--dataset=text:hf:OWNER/NAME[:CONFIG]`: listing, row-group reads and the offline failure, against a local
filesystem registered for fsspec's `hf` protocol in place of huggingface_hub's (the same glob/open calls)."""
from __future__ import annotations

import contextlib
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from transforms import datasets, read_hub_text
from transforms.datasets import DatasetUnavailableError, resolve_dataset

CARD = """---
configs:
- config_name: default
  default: true
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
  - split: test
    path: sample/test/*
---
# a corpus
"""


class StandInHub(DirFileSystem):
    """The hub's file tree (`datasets/OWNER/NAME/...`) in a local folder; records every file opened."""

    protocol = "hf"
    root = ""
    opened: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem())

    def open(self, path, *args, **kwargs):
        StandInHub.opened.append(self._strip_protocol(path))
        return super().open(path, *args, **kwargs)


def write_texts(path, texts, row_group_size):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "url": ["u"] * len(texts)}), path, row_group_size=row_group_size)


def make_hub(root, texts_per_file=((["alpha beta", "gamma"], ["delta", "epsilon zeta eta"]))) -> str:
    repo = root / "datasets" / "someone" / "corpus"
    (repo / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (repo / "README.md").write_text(CARD)
    for index, texts in enumerate(texts_per_file):
        write_texts(repo / "data" / f"CC-{index}" / f"train-{index:05d}.parquet", texts, 1)
    write_texts(repo / "sample" / "10BT" / "000.parquet", ["sample text"], 1)
    write_texts(repo / "sample" / "test" / "000.parquet", ["held out"], 1)
    write_texts(repo / "other" / "x.parquet", ["other"], 1)
    return str(root)


@contextlib.contextmanager
def hub_at(root: str, monkeypatch):
    """fsspec's "hf" protocol served by StandInHub over `root` while the block runs."""
    monkeypatch.setattr(StandInHub, "root", root)
    monkeypatch.setattr(StandInHub, "opened", [])
    previous = fsspec.get_filesystem_class("hf")
    fsspec.register_implementation("hf", StandInHub, clobber=True)
    StandInHub.clear_instance_cache()
    try:
        yield root
    finally:
        fsspec.register_implementation("hf", previous, clobber=True)


@pytest.fixture
def stand_in_hub(tmp_path, monkeypatch):
    with hub_at(make_hub(tmp_path / "hub"), monkeypatch) as root:
        yield root


def test_default_config_lists_its_files_in_order(stand_in_hub):
    source = resolve_dataset("text:hf:someone/corpus")
    assert (source.kind, source.file_format, source.dataset) == (datasets.TEXT, read_hub_text.HUB_PARQUET,
                                                                 "hf:someone/corpus")
    assert source.files == ("hf://datasets/someone/corpus/data/CC-0/train-00000.parquet",
                            "hf://datasets/someone/corpus/data/CC-1/train-00001.parquet")
    assert StandInHub.opened == ["datasets/someone/corpus/README.md"]  # listing opens no data file


def test_named_config_takes_its_train_split_and_a_folder_stands_for_a_config(stand_in_hub):
    assert resolve_dataset("text:hf:someone/corpus:sample-10BT").files == (
        "hf://datasets/someone/corpus/sample/10BT/000.parquet",)
    assert resolve_dataset("text:hf:someone/corpus:other").files == ("hf://datasets/someone/corpus/other/x.parquet",)


def test_unknown_config_names_the_known_ones(stand_in_hub):
    with pytest.raises(ValueError, match=r"no config 'nope' \(configs: default, sample-10BT\)"):
        resolve_dataset("text:hf:someone/corpus:nope")


def test_bad_spec_says_the_form():
    with pytest.raises(ValueError, match=r"text:hf:OWNER/NAME\[@REVISION\]\[:CONFIG\]"):
        read_hub_text.parse_spec("text:hf:justaname")
    assert read_hub_text.parse_spec("text:hf:o/n@v1:cfg") == ("o/n", "v1", "cfg")


def test_rows_are_read_one_row_group_at_a_time(stand_in_hub):
    path = resolve_dataset("text:hf:someone/corpus").files[0]
    assert len(read_hub_text.row_group_sizes(path)) == 2
    assert list(read_hub_text.iter_hub_rows(path, ["text"], 1, 1 << 20)) == [(1, {"text": "gamma"})]


def test_offline_fails_in_seconds_with_the_barc_paths_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clock = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as caught:
        resolve_dataset("text:hf:HuggingFaceFW/fineweb:sample-10BT")
    assert time.perf_counter() - clock < 5
    message = str(caught.value)
    assert message.startswith("--dataset=text:hf:HuggingFaceFW/fineweb:sample-10BT: the Hugging Face hub is offline "
                              "(HF_HUB_OFFLINE=1)")
    assert "--dataset='text:/path/to/fineweb/*.parquet'" in message
    assert "hf download HuggingFaceFW/fineweb --repo-type dataset" in message


def test_unreachable_hub_fails_in_seconds(monkeypatch):
    from huggingface_hub import HfFileSystem, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(read_hub_text, "hub_filesystem",
                        lambda: HfFileSystem(endpoint="http://127.0.0.1:9", skip_instance_cache=True))
    clock = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="cannot reach the Hugging Face hub within 1 s"):
        resolve_dataset("text:hf:someone/corpus", hub_timeout_s=1)
    assert time.perf_counter() - clock < 10


def test_a_budget_stops_reading_the_hub(tmp_path, monkeypatch, tiny_checkpoint, capsys):
    import pyarrow.dataset as ds

    from tests.test_waves import run

    ten = "grid cell row column pattern shape square line border corner"  # ten tokens
    root = make_hub(tmp_path / "hub", texts_per_file=([ten] * 3, [ten] * 3, [ten] * 3))
    with hub_at(root, monkeypatch):
        # The card's default config names data/*/*: three files; the budget is spent in the first.
        summary = run(capsys, f"--model={tiny_checkpoint}", "--dataset=text:hf:someone/corpus",
                      f"--output={tmp_path / 'out'}", "--max_tokens=25", "--wave_bytes=1")
    ids = sorted(ds.dataset(tmp_path / "out" / "samples", format="parquet").to_table(columns=["sample_id"])
                 .column("sample_id").to_pylist())
    assert ids == ["train-00000:row0/c0", "train-00000:row1/c0"] and summary["tokens"] == 20
    opened = {path.rsplit("/", 1)[-1] for path in StandInHub.opened}
    assert "train-00000.parquet" in opened and not opened & {"train-00001.parquet", "train-00002.parquet"}
