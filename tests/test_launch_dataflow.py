"""Dataflow submission for GPU and TPU workers, built with --dry_run: no network, no credentials, no staging."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import dataflow
from launch.dataflow import LaunchError, build_flags, gpu_accelerator, tpu_accelerator

ROOT = Path(__file__).resolve().parents[1]
CLOUD = dict(project="arc-acts-test", region="us-central1", temp_location="gs://arc-acts-bucket/tmp",
             output="gs://arc-acts-bucket/acts/run1")
PIPELINE = ["--model=random:qwen2.5-0.5b", "--dataset=arc-agi-1", "--layers=6,12", "--hooks=resid_post,mlp_out",
            "--batch_size=16", "--max_seq_len=4096"]


def flag_values(flags, name):
    return [f.split("=", 1)[1] for f in flags if f.split("=", 1)[0] == name]


def test_gpu_flags():
    flags = build_flags("gpu", **CLOUD, extra=PIPELINE)
    assert flags[0] == "--runner=DataflowRunner"
    assert flag_values(flags, "--dataflow_service_options") == [
        "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver:latest"]
    assert flag_values(flags, "--machine_type") == ["g2-standard-8"]
    assert flag_values(flags, "--sdk_container_image") == [
        "us-central1-docker.pkg.dev/arc-acts-test/arc-activations/worker-gpu:latest"]
    assert flag_values(flags, "--sdk_location") == ["container"]
    assert set(flag_values(flags, "--experiments")) == {"use_runner_v2", "no_use_multiple_sdk_containers"}
    assert flag_values(flags, "--number_of_worker_harness_threads") == ["1"]
    assert flag_values(flags, "--disk_size_gb") == ["100"]
    assert flags[-len(PIPELINE):] == PIPELINE


def test_h100_and_explicit_choices():
    flags = build_flags("gpu", **CLOUD, gpu_type="nvidia-h100-80gb", gpu_count=8, nvidia_driver="default",
                        image="eu.gcr.io/p/img:v3", harness_threads=4, max_num_workers=16, extra=["--disk_size_gb=300"])
    assert flag_values(flags, "--dataflow_service_options") == [
        "worker_accelerator=type:nvidia-h100-80gb;count:8;install-nvidia-driver"]
    assert flag_values(flags, "--machine_type") == ["a3-highgpu-8g"]
    assert flag_values(flags, "--sdk_container_image") == ["eu.gcr.io/p/img:v3"]
    assert flag_values(flags, "--number_of_worker_harness_threads") == ["4"]
    assert flag_values(flags, "--max_num_workers") == ["16"]
    assert flag_values(flags, "--disk_size_gb") == ["300"]  # the user's value, not a second default


def test_tpu_flags():
    flags = build_flags("tpu", **CLOUD, tpu_type="tpu-v6e-slice", tpu_topology="2x2", extra=PIPELINE)
    assert flag_values(flags, "--dataflow_service_options") == ["worker_accelerator=type:tpu-v6e-slice;topology:2x2"]
    assert flag_values(flags, "--machine_type") == ["ct6e-standard-4t"]
    assert flag_values(flags, "--sdk_container_image") == [
        "us-central1-docker.pkg.dev/arc-acts-test/arc-activations/worker-tpu:latest"]
    assert tpu_accelerator().machine_type == "ct5lp-hightpu-1t"
    assert tpu_accelerator("tpu-v7-slice", "1x1", machine_type="tpu7x-standard-1t").machine_type == "tpu7x-standard-1t"


@pytest.mark.parametrize(
    "target, changes, match",
    [
        ("gpu", dict(project=None), "--project is required"),
        ("gpu", dict(temp_location=None), "--temp_location is required for Dataflow"),
        ("gpu", dict(temp_location="/tmp/beam"), "--temp_location=/tmp/beam is not a gs:// path"),
        ("tpu", dict(output="/data/acts"), "--output=/data/acts is not a gs:// path"),
        ("tpu", dict(region=None), "--region is required"),
        ("gpu", dict(project="My Project"), "is not a project id"),
        ("gpu", dict(staging_location="s3://x/y"), "--staging_location=s3://x/y is not a gs:// path"),
        ("cpu", {}, "unknown target 'cpu'"),
        ("gpu", dict(gpu_type="nvidia-l4", gpu_count=3), "no default machine type for 3 x nvidia-l4: pass --machine_type"),
        ("tpu", dict(machine_type="n1-standard-8"), "--machine_type=n1-standard-8 does not match "
                                                    "tpu-v5-lite-podslice 1x1: Dataflow requires ct5lp-hightpu-1t"),
        ("tpu", dict(tpu_topology="1by1"), "--tpu_topology='1by1' is not a topology"),
        ("gpu", dict(harness_threads=0), "--harness_threads must be at least 1"),
        ("gpu", dict(extra=["--project=other-project"]), "--project set twice"),
        ("gpu", dict(extra=["--machine_type=n1-standard-4"]), "pass --machine_type as the launcher's option"),
        ("gpu", dict(extra=["--model=/home/me/qwen"]), "--model=/home/me/qwen: a local path on this machine"),
        ("gpu", dict(extra=["--dataset=./tasks.json"]), "--dataset=./tasks.json: a local path"),
    ],
)
def test_flag_errors_name_the_option(target, changes, match):
    with pytest.raises(LaunchError, match=match.replace("(", r"\(").replace("+", r"\+")):
        build_flags(target, **{**CLOUD, **changes})


def test_gpu_type_is_checked():
    with pytest.raises(LaunchError, match="not a Dataflow GPU type"):
        gpu_accelerator("h100")


def test_cli_reports_errors_without_a_traceback(capsys):
    assert dataflow.main(["gpu", "--project=arc-acts-test", "--region=us-central1", "--output=gs://b-b/o"]) == 2
    assert "--temp_location is required" in capsys.readouterr().err


# --- dry runs of the real pipeline -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run_jobs():
    """One Dataflow job per target, built from the real pipeline graph, offline."""
    jobs = {}
    for target, kwargs in (("gpu", dict(gpu_type="nvidia-h100-80gb")), ("tpu", {})):
        flags = build_flags(target, **CLOUD, dry_run=True, job_name=f"arc-{target}-dry", extra=PIPELINE, **kwargs)
        job = dataflow.dry_run_job(flags)
        jobs[target] = (job, dataflow.job_description(job))
    return jobs


@pytest.mark.parametrize(
    "target, machine_type, service_option, image",
    [
        ("gpu", "a3-highgpu-1g", "worker_accelerator=type:nvidia-h100-80gb;count:1;install-nvidia-driver:latest",
         "us-central1-docker.pkg.dev/arc-acts-test/arc-activations/worker-gpu:latest"),
        ("tpu", "ct5lp-hightpu-1t", "worker_accelerator=type:tpu-v5-lite-podslice;topology:1x1",
         "us-central1-docker.pkg.dev/arc-acts-test/arc-activations/worker-tpu:latest"),
    ],
)
def test_dry_run_builds_the_dataflow_job(dry_run_jobs, target, machine_type, service_option, image):
    job, described = dry_run_jobs[target]
    assert described["name"] == f"arc-{target}-dry" and described["type"] == "JOB_TYPE_BATCH"
    environment = described["environment"]
    assert environment["serviceOptions"] == [service_option]
    assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(environment["experiments"])
    assert "use_multiple_sdk_containers" not in environment["experiments"]
    (pool,) = environment["workerPools"]
    assert pool["machineType"] == machine_type
    assert pool["diskSizeGb"] == 100
    assert pool["numThreadsPerWorker"] == 1
    assert pool["workerHarnessContainerImage"] == image
    assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [image]
    assert environment["tempStoragePrefix"].startswith("storage.googleapis.com/arc-acts-bucket/tmp/")
    options = environment["sdkPipelineOptions"]["options"]
    assert options["output"] == CLOUD["output"] and options["layers"] == "6,12" and options["model"] == PIPELINE[0][8:]
    assert options["sdk_location"] == "container" and options["project"] == CLOUD["project"]


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_dry_run_graph_is_the_real_pipeline_in_the_worker_image(dry_run_jobs, target):
    from apache_beam.portability.api import beam_runner_api_pb2

    job, described = dry_run_jobs[target]
    proto = job.proto_pipeline
    labels = {t.unique_name.split("/")[0] for t in proto.components.transforms.values()}
    assert {"Read", "Validate", "Tokenize", "Batch", "Extract", "Write", "WriteDeadLetters"} <= labels
    images = set()
    for environment in proto.components.environments.values():
        payload = beam_runner_api_pb2.DockerPayload.FromString(environment.payload)
        images.add(payload.container_image)
    assert images == {described["environment"]["workerPools"][0]["workerHarnessContainerImage"]}


def test_dry_run_from_the_command_line_needs_no_credentials(tmp_path):
    """As a user runs it, with no credentials anywhere (empty HOME, no ADC variable) and no metadata server."""
    job_file = tmp_path / "job.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_", "STORAGE_EMULATOR"))}
    env.update(HOME=str(tmp_path), NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "launch.dataflow", "tpu", *(f"--{k}={v}" for k, v in CLOUD.items()),
         "--tpu_type=tpu-v5-lite-podslice", "--tpu_topology=2x4", "--dry_run=True", f"--job_file={job_file}",
         *PIPELINE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "not submitted" in done.stderr
    assert "credentials" not in done.stderr.lower(), done.stderr[-4000:]
    described = json.loads(job_file.read_text())
    assert json.loads(done.stdout) == described
    assert described["environment"]["workerPools"][0]["machineType"] == "ct5lp-hightpu-8t"
    assert described["environment"]["serviceOptions"] == ["worker_accelerator=type:tpu-v5-lite-podslice;topology:2x4"]


def test_dry_run_reports_pipeline_option_errors(capsys):
    flags = [*(f"--{k}={v}" for k, v in CLOUD.items()), "--dry_run", "--model=random:qwen2.5-0.5b",
             "--layers=999", "--dataset=arc-agi-1"]
    assert dataflow.main(["gpu", *flags]) == 2
    assert "999" in capsys.readouterr().err
