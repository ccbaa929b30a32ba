import collections
import math
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.metrics import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from transforms.metrics import NAMESPACE
from transforms.shares import TakeHostShare, host_share, share_id, share_of

# Ids shaped like the real ones: ARC-AGI keys, BARC file:line ids and their sample ids.
IDS = (
    [f"arc-agi-1/train:{i:08x}" for i in range(1500)]
    + [f"barc0/data_100k:{line}" for line in range(1500)]
    + [f"local:/data/tasks:{i}/t0/a{i % 3}" for i in range(1000)]
)


@pytest.mark.parametrize("num_hosts", [1, 2, 3, 8])
def test_shares_cover_every_id_exactly_once_and_are_balanced(num_hosts):
    owners = collections.Counter()
    sizes = collections.Counter()
    for record_id in IDS:
        hosts = [h for h in range(num_hosts) if host_share(record_id, h, num_hosts)]
        assert len(hosts) == 1, (record_id, hosts)
        owners[record_id] += 1
        sizes[hosts[0]] += 1
    assert set(owners.values()) == {1} and len(owners) == len(IDS)
    assert sum(sizes.values()) == len(IDS)
    expected = len(IDS) / num_hosts
    # Each host's count is binomial(n, 1/N) for a uniform hash: 4.5 standard deviations (about 17% of 500 ids
    # for 8 hosts, 8% of 2000 for 2) fails a biased hash and passes a fair one with near certainty.
    tolerance = max(4.5 * math.sqrt(expected * (1 - 1 / num_hosts)), 0.5)
    for host in range(num_hosts):
        assert abs(sizes[host] - expected) <= tolerance, (host, sizes, expected)


def test_share_is_stable_across_processes_and_hash_seeds():
    sample = IDS[::97]
    here = [share_of(i, 8) for i in sample]
    code = (
        "import json, sys; from transforms.shares import share_of; "
        "print(json.dumps([share_of(i, 8) for i in json.load(sys.stdin)]))")
    import json

    processes = [subprocess.Popen(  # at once: each one's time is its imports
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        cwd=str(__import__("pathlib").Path(__file__).parents[1])) for seed in ("0", "12345")]
    for process in processes:
        stdout, stderr = process.communicate(json.dumps(sample), timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert json.loads(stdout) == here


def test_known_values_pin_the_hash():
    # Pinned so that a change of hash (which would reshuffle every running multi-host job) is a visible decision.
    import hashlib

    for record_id in ("arc-agi-1/train:007bbfb7", "barc0/data_100k:17"):
        digest = hashlib.sha256(record_id.encode()).digest()
        assert share_of(record_id, 8) == int.from_bytes(digest[:8], "big") % 8


@pytest.mark.parametrize(
    "host_index, num_hosts, error, match",
    [
        (0, 0, ValueError, "--num_hosts must be at least 1"),
        (-1, 4, ValueError, r"--host_index=-1 is out of range for --num_hosts=4: use 0..3"),
        (4, 4, ValueError, r"--host_index=4 is out of range for --num_hosts=4"),
        ("1", 4, TypeError, "--host_index must be an int"),
        (0, 2.0, TypeError, "--num_hosts must be an int"),
        (True, 2, TypeError, "--host_index must be an int"),
    ],
)
def test_invalid_share_arguments_are_clear_errors(host_index, num_hosts, error, match):
    with pytest.raises(error, match=match):
        host_share("x", host_index, num_hosts)
    with pytest.raises(error, match=match):
        TakeHostShare(host_index, num_hosts)


def test_share_id_prefers_record_id_and_rejects_elements_without_id():
    assert share_id({"record_id": "a:1", "sample_id": "a:1/t0/a0"}) == "a:1"
    assert share_id({"sample_id": "text:/c.parquet:3"}) == "text:/c.parquet:3"
    with pytest.raises(KeyError, match="no non-empty 'record_id' or 'sample_id'.*keys: \\['train'\\]"):
        share_id({"train": []})
    with pytest.raises(TypeError, match="expects dict elements"):
        share_id("a:1")
    with pytest.raises(TypeError, match="must be a str"):
        share_of(17, 2)


def test_samples_of_one_task_stay_on_one_host():
    # record_id decides, so a task's augmentations never straddle two hosts.
    tasks = [{"record_id": f"arc-agi-1/eval:{i}", "sample_id": f"arc-agi-1/eval:{i}/t0/a{a}"}
             for i in range(200) for a in range(3)]
    by_task = collections.defaultdict(set)
    for task in tasks:
        by_task[task["record_id"]].add(share_of(share_id(task), 3))
    assert all(len(hosts) == 1 for hosts in by_task.values())


def test_take_host_share_pipelines_partition_the_input():
    num_hosts = 3
    records = [{"record_id": f"arc-agi-2/train:{i:04d}", "train": [], "test": []} for i in range(300)]
    kept_ids = []
    for host in range(num_hosts):
        expected = [r["record_id"] for r in records if host_share(r["record_id"], host, num_hosts)]
        kept_ids.extend(expected)
        pipeline = beam.Pipeline(runner=FnApiRunner())
        kept = (pipeline | beam.Create(records) | TakeHostShare(host, num_hosts)
                | beam.Map(lambda r: r["record_id"]))
        assert_that(kept, equal_to(expected))
        result = pipeline.run()
        result.wait_until_finish()
        counters = {c.key.metric.name: c.committed
                    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]}
        assert counters["host_share_kept"] == len(expected)
        assert counters["host_share_other_hosts"] == len(records) - len(expected)
    assert sorted(kept_ids) == sorted(r["record_id"] for r in records)
