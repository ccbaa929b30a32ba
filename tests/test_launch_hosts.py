"""Two TPU-VM hosts: `python -m launch.tpu_vm host` runs each host's share of the pipeline into one gs:// output (a
local GCS emulator), and together they write every sample exactly once (one host after the other in this process;
at once, as real processes, in the slow set); the Dataflow dry run through the driver's own main leaves the output
untouched."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.arc_fixtures import write_challenges
from transforms.shares import host_share

ROOT = Path(__file__).resolve().parents[1]


def _sample_ids(output: str) -> dict[str, list[str]]:
    """Sample ids per samples file (commit marker)."""
    import io

    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from transforms.write import samples_files

    ids = {}
    for path in samples_files(output):
        with FileSystems.open(path) as handle:
            ids[path] = pq.read_table(io.BytesIO(handle.read()), columns=["sample_id"]).column("sample_id").to_pylist()
    return ids


def host_command(host, *, output, checkpoint, dataset, max_attempts=2):
    return [sys.executable, "-m", "launch.tpu_vm", "host", "--num_hosts=2", f"--host_index={host}",
            f"--output={output}", f"--max_attempts={max_attempts}", "--backoff_seconds=0", "--",
            f"--model={checkpoint}", f"--dataset={dataset}", "--layers=0,1", "--hooks=resid_post",
            "--batch_size=2", "--max_seq_len=1024", "--progress_interval=0", "--dtype=float32"]


def host_here(host, **kwargs) -> subprocess.CompletedProcess:
    """`python -m launch.tpu_vm host` in this process, each attempt's `python -m pipeline.run` too (through
    run_main, as its __main__ does): what the launcher decides and writes, without two process starts."""
    import contextlib
    import io
    from types import SimpleNamespace

    import launch.tpu_vm as tpu_vm
    from tests.test_end_to_end import run_here

    def call(argv):
        assert argv[:3] == [sys.executable, "-m", "pipeline.run"], argv
        return run_here(*argv[3:], check=False).returncode

    command = host_command(host, **kwargs)
    assert command[:3] == [sys.executable, "-m", "launch.tpu_vm"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        patch.setattr(tpu_vm, "subprocess", SimpleNamespace(call=call))
        code = tpu_vm.main(command[3:])
    return subprocess.CompletedProcess(command, code, stdout.getvalue(), stderr.getvalue())


# The hosts run one after the other in this process by default; at once, as real processes, in the slow set.
@pytest.fixture(scope="module", params=["in_process", pytest.param("processes", marks=pytest.mark.slow)])
def two_host_run(request, gcs_emulator, tiny_checkpoint, tmp_path_factory):
    from transforms.datasets import resolve_dataset

    folder = tmp_path_factory.mktemp("hosts")
    # Record ids include the dataset's absolute path, so which host takes which task depends on the temporary
    # folder: add tasks until both hosts have a good one to write.
    for count in range(6, 40):
        dataset, tasks = write_challenges(folder / "challenges.json", count=count, bad=True)
        label = resolve_dataset(str(dataset)).dataset
        if all(any(host_share(f"{label}:{task}", host, 2) for task in tasks if task != "badbool0") for host in (0, 1)):
            break
    output = f"{gcs_emulator.root}/runs/two-hosts-{request.param}"
    env = dict(os.environ, NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               STORAGE_EMULATOR_HOST=gcs_emulator.host)
    context = dict(env=env, dataset=dataset, in_process=request.param == "in_process")
    if context["in_process"]:
        runs = [host_here(host, output=output, checkpoint=tiny_checkpoint, dataset=dataset) for host in (0, 1)]
        return output, tasks, runs, context
    # Both hosts at once, as on TPU VMs: they share nothing but the output.
    hosts = [subprocess.Popen(host_command(host, output=output, checkpoint=tiny_checkpoint, dataset=dataset),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for host in (0, 1)]
    runs = []
    for host in hosts:
        stdout, stderr = host.communicate(timeout=600)
        runs.append(subprocess.CompletedProcess(host.args, host.returncode, stdout, stderr))
    return output, tasks, runs, context


def test_two_hosts_write_every_sample_exactly_once(two_host_run):
    from apache_beam.io.filesystems import FileSystems

    from launch.tpu_vm import done_marker

    output, tasks, runs, _ = two_host_run
    for host, run in enumerate(runs):
        assert run.returncode == 0, run.stderr[-5000:]
        assert run.stdout.strip().endswith(done_marker(output, host, 2))
        with FileSystems.open(done_marker(output, host, 2)) as handle:
            marker = json.loads(handle.read())
        assert marker["attempts"] == 1 and marker["returncodes"] == [0]

    per_file = _sample_ids(output)
    written = [sample for ids in per_file.values() for sample in ids]
    assert len(written) == len(set(written)), "a sample was written twice"
    good_tasks = [task_id for task_id in tasks if task_id != "badbool0"]
    expected_tasks = {(task_id, index) for task_id in good_tasks for index in range(len(tasks[task_id]["test"]))}
    assert len(written) == len(expected_tasks)
    assert {(s.rsplit("/", 2)[0].rsplit(":", 1)[1], int(s.rsplit("/", 2)[1][1:])) for s in written} == expected_tasks

    # Each host wrote exactly the records of its own share, under its own shard prefix.
    hosts_used = set()
    for path, ids in per_file.items():
        shard = path.rsplit("/", 1)[1]
        host = int(shard[1:4])
        hosts_used.add(host)
        for sample in ids:
            assert host_share(sample.rsplit("/", 2)[0], host, 2), (sample, shard)
    assert hosts_used == {0, 1}, "with 6 tasks both shares should be non-empty"


def test_the_bad_record_is_dead_lettered_by_exactly_one_host(two_host_run):
    from apache_beam.io.filesystems import FileSystems

    output = two_host_run[0]
    lines = []
    for meta in FileSystems.match([f"{output}/dead_letter/*"])[0].metadata_list:
        with FileSystems.open(meta.path) as handle:
            lines += [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "badbool0" in json.dumps(lines[0])


def test_manifest_counts_every_hosts_reads(two_host_run):
    from apache_beam.io.filesystems import FileSystems

    from pipeline.manifest import rebuild_manifest

    output, tasks, _, _ = two_host_run
    manifest = rebuild_manifest(output)  # as `python -m pipeline.manifest OUTPUT` does once all hosts are done
    assert set(manifest["hosts"]) == {"h000", "h001"}
    counters = manifest["run_counters"]
    # Each host reads every record and keeps its share: the shares add up to the whole input.
    assert counters["host_share_kept"] == len(tasks)
    assert counters["records_valid"] + counters["records_rejected"] == len(tasks)
    assert counters["records_rejected"] == 1
    assert manifest["counts"]["samples"] == sum(len(t["test"]) for k, t in tasks.items() if k != "badbool0")
    with FileSystems.open(f"{output}/manifest.json") as handle:
        assert json.loads(handle.read())["hosts"].keys() == manifest["hosts"].keys()


def test_merged_statistics_of_both_hosts_equal_numpy(two_host_run):
    from pipeline import stats as pipeline_stats
    from pipeline.manifest import rebuild_manifest
    from tests.stats_reference import check_stats_against_numpy

    output = two_host_run[0]
    manifest = rebuild_manifest(output)  # every host's committed shards, each read once
    assert manifest["stats"]["shards"] == manifest["counts"]["shards"] and not manifest["stats"]["shards_without_stats"]
    stored = pipeline_stats.read_stats(output)
    assert check_stats_against_numpy(output, stored) == manifest["counts"]["tokens"]
    assert pipeline_stats.compare(stored, pipeline_stats.recompute(output)) == []


def test_two_host_output_verifies_and_a_restarted_host_adds_nothing(two_host_run, tiny_checkpoint):
    output, tasks, runs, context = two_host_run
    before = _sample_ids(output)
    # The restarted host finds everything committed, computes nothing, and (finishing last) writes the manifest
    # from every host's commit markers, which verify then checks.
    host = dict(output=output, checkpoint=tiny_checkpoint, dataset=context["dataset"], max_attempts=1)
    if context["in_process"]:
        from tests.test_end_to_end import verify_here

        rerun = host_here(0, **host)
    else:
        rerun = subprocess.run(host_command(0, **host), cwd=ROOT, env=context["env"], capture_output=True, text=True,
                               timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert _sample_ids(output) == before
    if context["in_process"]:
        verify = verify_here(output)
    else:
        verify = subprocess.run([sys.executable, "-m", "pipeline.verify", output], cwd=ROOT, env=context["env"],
                                capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]


def test_dataflow_dry_run_through_the_driver_writes_nothing(gcs_emulator, capsys):
    from apache_beam.io.filesystems import FileSystems

    from launch.dataflow import build_flags
    from pipeline.run import main

    output = f"{gcs_emulator.root}/runs/dry"
    flags = build_flags("gpu", project="arc-acts-test", region="us-central1", temp_location=f"{gcs_emulator.root}/tmp",
                        output=output, dry_run=True,
                        extra=["--model=random:qwen2.5-0.5b", "--dataset=arc-agi-1", "--no_auth"])
    assert main(flags) == 0
    assert "dry run" in capsys.readouterr().out
    assert FileSystems.match([f"{output}/**"])[0].metadata_list == []
