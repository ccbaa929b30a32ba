"""Submit the extraction pipeline to Google Cloud Dataflow on GPU or TPU workers.

    python -m launch.dataflow gpu --project=my-proj --region=us-central1 \\
        --temp_location=gs://my-bucket/tmp --output=gs://my-bucket/acts/run1 \\
        --model=Qwen/Qwen2.5-0.5B-Instruct --dataset=arc-agi-1 --layers=12 [--dry_run]
    python -m launch.dataflow tpu ... --tpu_type=tpu-v5-lite-podslice --tpu_topology=1x1

The launcher turns a target (gpu or tpu) into the Dataflow flags that target needs and hands everything to
``pipeline.run.main``; every pipeline flag (--model, --dataset, --layers, ...) and every Beam flag passes through
unchanged, and an explicit Beam flag wins over the launcher's default for it.

What each target sets, and why (docs/launch.md has the sources):

* Runner v2 with a custom SDK container (``--sdk_container_image``, ``--sdk_location=container``): the image
  carries JAX for the accelerator and this project, so workers install nothing at start-up and the launcher
  stages nothing but the job graph.
* ``--experiments=no_use_multiple_sdk_containers``: Dataflow otherwise starts one SDK process per vCPU, and every
  process would load its own copy of the model onto the one accelerator. One process per VM holds one model
  (``ExtractActivations`` shares it between the harness threads of that process).
* ``--number_of_worker_harness_threads`` (default 1): bundles in flight per worker; the extraction DoFn already
  overlaps the device with the host's copy and Parquet encoding.
* GPU: ``--dataflow_service_options=worker_accelerator=type:T;count:N;install-nvidia-driver[:VERSION]`` and a
  machine type that carries those GPUs (g2-standard-* for L4, a3-highgpu-*g for H100, ...).
* TPU: ``--dataflow_service_options=worker_accelerator=type:T;topology:AxB`` and the one machine type Dataflow
  accepts for that (type, topology) pair (ct5lp-hightpu-1t for a v5e 1x1, ...).

``--dry_run`` builds the complete Dataflow job (the graph of the real pipeline, worker pool, accelerator, image)
without credentials or network, prints it as JSON and submits nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from launch import launcher_parser

_LOG = logging.getLogger("launch.dataflow")

TARGETS = ("gpu", "tpu")

# (GPU type, GPUs per worker) -> a machine type that carries exactly those GPUs (Compute Engine GPU platforms).
GPU_MACHINE_TYPES: dict[tuple[str, int], str] = {
    ("nvidia-l4", 1): "g2-standard-8",
    ("nvidia-l4", 2): "g2-standard-24",
    ("nvidia-l4", 4): "g2-standard-48",
    ("nvidia-l4", 8): "g2-standard-96",
    ("nvidia-h100-80gb", 1): "a3-highgpu-1g",
    ("nvidia-h100-80gb", 2): "a3-highgpu-2g",
    ("nvidia-h100-80gb", 4): "a3-highgpu-4g",
    ("nvidia-h100-80gb", 8): "a3-highgpu-8g",
    ("nvidia-h100-mega-80gb", 8): "a3-megagpu-8g",
    ("nvidia-a100-80gb", 1): "a2-ultragpu-1g",
    ("nvidia-a100-80gb", 2): "a2-ultragpu-2g",
    ("nvidia-a100-80gb", 4): "a2-ultragpu-4g",
    ("nvidia-a100-80gb", 8): "a2-ultragpu-8g",
    ("nvidia-tesla-a100", 1): "a2-highgpu-1g",
    ("nvidia-tesla-a100", 2): "a2-highgpu-2g",
    ("nvidia-tesla-a100", 4): "a2-highgpu-4g",
    ("nvidia-tesla-a100", 8): "a2-highgpu-8g",
    ("nvidia-tesla-t4", 1): "n1-standard-8",
}

# (TPU type, topology) -> the worker machine type Dataflow requires for it (Dataflow "TPU support" page).
TPU_MACHINE_TYPES: dict[tuple[str, str], str] = {
    ("tpu-v5-lite-podslice", "1x1"): "ct5lp-hightpu-1t",
    ("tpu-v5-lite-podslice", "2x2"): "ct5lp-hightpu-4t",
    ("tpu-v5-lite-podslice", "2x4"): "ct5lp-hightpu-8t",
    ("tpu-v6e-slice", "1x1"): "ct6e-standard-1t",
    ("tpu-v6e-slice", "2x2"): "ct6e-standard-4t",
    ("tpu-v6e-slice", "2x4"): "ct6e-standard-8t",
    ("tpu-v5p-slice", "2x2x1"): "ct5p-hightpu-4t",
}

DEFAULT_GPU = "nvidia-l4"
DEFAULT_TPU = ("tpu-v5-lite-podslice", "1x1")
# CUDA 12 wheels of jaxlib need a recent driver; Dataflow's "latest" is the newest one its worker OS offers.
DEFAULT_NVIDIA_DRIVER = "latest"
DEFAULT_DISK_GB = {"gpu": 100, "tpu": 100}
IMAGE_REPOSITORY = "arc-activations"

_PROJECT_ID = re.compile(r"^[a-z][-a-z0-9:.]{4,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
_TOPOLOGY = re.compile(r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$")


class LaunchError(ValueError):
    """A launcher option that cannot work on Dataflow; the message names the option and what to do."""


@dataclass(frozen=True)
class Accelerator:
    """The worker_accelerator service option and the machine type that goes with it."""

    service_option: str
    machine_type: str


def gpu_accelerator(gpu_type: str = DEFAULT_GPU, count: int = 1, *, machine_type: str | None = None,
                    nvidia_driver: str | None = DEFAULT_NVIDIA_DRIVER) -> Accelerator:
    if not re.fullmatch(r"nvidia-[a-z0-9-]+", gpu_type or ""):
        raise LaunchError(f"--gpu_type={gpu_type!r} is not a Dataflow GPU type such as nvidia-l4 or nvidia-h100-80gb")
    if count < 1:
        raise LaunchError(f"--gpu_count must be at least 1, got {count}")
    if machine_type is None:
        machine_type = GPU_MACHINE_TYPES.get((gpu_type, count))
        if machine_type is None:
            known = ", ".join(f"{t} x{n}" for t, n in GPU_MACHINE_TYPES)
            raise LaunchError(
                f"no default machine type for {count} x {gpu_type}: pass --machine_type (a Compute Engine machine "
                f"type that carries {count} {gpu_type} GPU(s)); defaults exist for {known}")
    driver = "install-nvidia-driver" if not nvidia_driver or nvidia_driver == "default" \
        else f"install-nvidia-driver:{nvidia_driver}"
    return Accelerator(f"worker_accelerator=type:{gpu_type};count:{count};{driver}", machine_type)


def tpu_accelerator(tpu_type: str = DEFAULT_TPU[0], topology: str = DEFAULT_TPU[1], *,
                    machine_type: str | None = None) -> Accelerator:
    if not re.fullmatch(r"tpu-[a-z0-9-]+", tpu_type or ""):
        raise LaunchError(f"--tpu_type={tpu_type!r} is not a Dataflow TPU type such as tpu-v5-lite-podslice")
    if not _TOPOLOGY.fullmatch(topology or ""):
        raise LaunchError(f"--tpu_topology={topology!r} is not a topology such as 1x1, 2x4 or 2x2x1")
    required = TPU_MACHINE_TYPES.get((tpu_type, topology))
    if machine_type is None:
        if required is None:
            known = ", ".join(f"{t} {topo}" for t, topo in TPU_MACHINE_TYPES)
            raise LaunchError(
                f"no machine type known for {tpu_type} {topology}: pass --machine_type (Dataflow requires one "
                f"machine type per TPU type and topology); known pairs: {known}")
        machine_type = required
    elif required is not None and machine_type != required:
        raise LaunchError(
            f"--machine_type={machine_type} does not match {tpu_type} {topology}: Dataflow requires "
            f"{required} for it")
    return Accelerator(f"worker_accelerator=type:{tpu_type};topology:{topology}", machine_type)


def default_image(target: str, project: str, region: str, tag: str = "latest") -> str:
    """The Artifact Registry image that docs/launch.md builds and pushes for `target`."""
    return f"{region}-docker.pkg.dev/{project}/{IMAGE_REPOSITORY}/worker-{target}:{tag}"


def _flag_names(flags: Sequence[str]) -> set[str]:
    return {flag.split("=", 1)[0] for flag in flags if flag.startswith("--")}


def _is_local_path(value: str) -> bool:
    """A path only the launching machine can read (the workers are other machines)."""
    if "://" in value:
        return False
    if value.startswith(("random:", "arc-agi-1", "arc-agi-2")):
        return False
    if value.startswith("text:"):
        return _is_local_path(value[len("text:"):])
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value)


def _check_gcs(option: str, value: str | None) -> None:
    if not value:
        raise LaunchError(f"--{option} is required for Dataflow: a gs://bucket/path the workers can reach")
    if not re.fullmatch(r"gs://[a-z0-9][-_a-z0-9.]+[a-z0-9](/.*)?", value):
        raise LaunchError(
            f"--{option}={value} is not a gs:// path: Dataflow workers run on other machines and can only reach "
            "Cloud Storage (e.g. gs://my-bucket/tmp)")


def build_flags(target: str, *, project: str | None, region: str | None, temp_location: str | None,
                output: str | None, image: str | None = None, staging_location: str | None = None,
                gpu_type: str = DEFAULT_GPU, gpu_count: int = 1, nvidia_driver: str | None = DEFAULT_NVIDIA_DRIVER,
                tpu_type: str = DEFAULT_TPU[0], tpu_topology: str = DEFAULT_TPU[1],
                machine_type: str | None = None, disk_size_gb: int | None = None, harness_threads: int = 1,
                max_num_workers: int | None = None, job_name: str | None = None, dry_run: bool = False,
                extra: Sequence[str] = ()) -> list[str]:
    """The full `python -m pipeline.run` argument list that runs the pipeline on Dataflow `target` workers.

    `extra` holds the pipeline's own flags (--model, --dataset, --layers, ...) and any Beam flag; an extra flag
    that the launcher would also set (say --disk_size_gb or --number_of_worker_harness_threads) replaces the
    launcher's default, except the flags that define the target, which conflict and raise LaunchError.
    """
    _check_job(target, project, region, temp_location, staging_location, output, harness_threads)
    extra = list(extra)
    given = _check_extra(extra)
    if target == "gpu":
        accelerator = gpu_accelerator(gpu_type, gpu_count, machine_type=machine_type, nvidia_driver=nvidia_driver)
    else:
        accelerator = tpu_accelerator(tpu_type, tpu_topology, machine_type=machine_type)

    flags = [
        "--runner=DataflowRunner",
        f"--project={project}",
        f"--region={region}",
        f"--temp_location={temp_location}",
        f"--output={output}",
        f"--sdk_container_image={image or default_image(target, project, region)}",
        # The SDK is the image's own: nothing to download or stage, and the launcher's Beam must match it.
        "--sdk_location=container",
        "--experiments=use_runner_v2",
        "--experiments=no_use_multiple_sdk_containers",
        f"--dataflow_service_options={accelerator.service_option}",
        f"--machine_type={accelerator.machine_type}",
    ]
    if staging_location:
        flags.append(f"--staging_location={staging_location}")
    if "--number_of_worker_harness_threads" not in given:
        flags.append(f"--number_of_worker_harness_threads={harness_threads}")
    if "--disk_size_gb" not in given:
        flags.append(f"--disk_size_gb={disk_size_gb or DEFAULT_DISK_GB[target]}")
    if max_num_workers is not None and "--max_num_workers" not in given:
        flags.append(f"--max_num_workers={max_num_workers}")
    if job_name and "--job_name" not in given:
        flags.append(f"--job_name={job_name}")
    if dry_run and "--dry_run" not in given:
        flags.append("--dry_run=True")
    return flags + extra


def _check_job(target: str, project: str | None, region: str | None, temp_location: str | None,
               staging_location: str | None, output: str | None, harness_threads: int) -> None:
    """The launcher's own options, before anything is built from them."""
    if target not in TARGETS:
        raise LaunchError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    if not project:
        raise LaunchError("--project is required: the Google Cloud project that runs the Dataflow job")
    if not _PROJECT_ID.fullmatch(project):
        raise LaunchError(f"--project={project!r} is not a project id (lower case letters, digits and hyphens)")
    if not region:
        raise LaunchError("--region is required: the Dataflow region, e.g. us-central1 (TPUs: a region that has "
                          "them, e.g. us-west1 or us-east5)")
    if not _REGION.fullmatch(region):
        raise LaunchError(f"--region={region!r} is not a region such as us-central1")
    _check_gcs("temp_location", temp_location)
    if staging_location is not None:
        _check_gcs("staging_location", staging_location)
    _check_gcs("output", output)
    if harness_threads < 1:
        raise LaunchError(f"--harness_threads must be at least 1, got {harness_threads}")


def _check_extra(extra: list[str]) -> set[str]:
    """The names of the pipeline flags given, once none of them clashes with the launcher's or names a path
    only this machine can read."""
    given = _flag_names(extra)
    owned = {"--runner", "--project", "--region", "--temp_location", "--output", "--sdk_container_image",
             "--dataflow_service_options", "--staging_location"}
    clashes = sorted(given & owned)
    if clashes:
        raise LaunchError(
            f"{', '.join(clashes)} set twice: pass them as the launcher's own options (python -m launch.dataflow "
            "--help), not among the pipeline flags")
    if {"--machine_type", "--worker_machine_type"} & given:
        raise LaunchError("pass --machine_type as the launcher's option so it is checked against the accelerator")
    for option in ("--model", "--dataset"):
        for flag in extra:
            if flag.startswith(option + "=") and _is_local_path(flag.split("=", 1)[1]):
                raise LaunchError(
                    f"{flag}: a local path on this machine, which Dataflow workers cannot read; copy it to "
                    "gs:// (or use a hub id / built-in dataset) and pass that instead")
    return given


# --- dry run: the job Dataflow would receive, built offline ------------------------------------------------------

def job_description(job) -> dict[str, Any]:
    """The Dataflow Job request as JSON, with the environment (worker pool, machine type, accelerator, image,
    experiments) that Beam adds only at submission, after staging. Built from the same options with Beam's own
    `apiclient.Environment`, so it is what `create_job` would send, less the staged package list."""
    from google.protobuf import json_format

    from apache_beam.runners.dataflow.internal import apiclient

    staging = job.google_cloud_options.staging_location
    environment = apiclient.Environment(
        packages=[], options=job.options, environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url=f"{staging.rstrip('/')}/pipeline.pb", proto_pipeline=job.proto_pipeline)
    job.proto.environment = environment.proto
    return json.loads(json_format.MessageToJson(job.proto._pb))


def dry_run_job(flags: Sequence[str]):
    """Builds the real pipeline for Dataflow with --dry_run and returns Beam's `apiclient.Job`.

    Runs the driver's own steps (option checks, model config, graph) but not its output preparation, which lists
    the gs:// output and would need credentials; nothing is staged or submitted and no credentials are read
    (`--no_auth`)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import ExtractOptions
    from pipeline.run import build_pipeline, resolve_capture

    flags = list(flags)
    names = _flag_names(flags)
    if "--dry_run" not in names:
        flags.append("--dry_run=True")
    if "--no_auth" not in names:
        flags.append("--no_auth")
    options = PipelineOptions(flags)
    opts = options.view_as(ExtractOptions)
    opts.validate_extract()
    _, hooks, layers = resolve_capture(opts)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, opts, hooks=hooks, layers=layers)
    result = pipeline.run()
    return result.job


# --- command line ------------------------------------------------------------------------------------------------

def _boolean(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    parser = launcher_parser(
        "dataflow", "Run the extraction pipeline on Dataflow GPU or TPU workers. Flags this launcher does not "
                    "know (--model, --dataset, --layers, any Beam option) go to python -m pipeline.run.",
        "docs/launch.md: building the worker images, quotas, and what each flag is for.")
    parser.add_argument("target", choices=TARGETS, help="worker accelerator family")
    parser.add_argument("--project", help="Google Cloud project id")
    parser.add_argument("--region", help="Dataflow region, e.g. us-central1")
    parser.add_argument("--temp_location", help="gs:// path for Dataflow's temporary files")
    parser.add_argument("--staging_location", help="gs:// path for staged files (default: --temp_location)")
    parser.add_argument("--output", help="gs:// output root of the activations")
    parser.add_argument("--image", help="worker SDK container image (default: the Artifact Registry image "
                                        "<region>-docker.pkg.dev/<project>/arc-activations/worker-<target>:latest)")
    parser.add_argument("--gpu_type", default=DEFAULT_GPU, help="Dataflow GPU type, e.g. nvidia-l4, nvidia-h100-80gb")
    parser.add_argument("--gpu_count", type=int, default=1, help="GPUs per worker VM")
    parser.add_argument("--nvidia_driver", default=DEFAULT_NVIDIA_DRIVER,
                        help="install-nvidia-driver version: latest or default")
    parser.add_argument("--tpu_type", default=DEFAULT_TPU[0], help="Dataflow TPU type, e.g. tpu-v5-lite-podslice")
    parser.add_argument("--tpu_topology", default=DEFAULT_TPU[1], help="TPU topology per worker, e.g. 1x1, 2x2")
    parser.add_argument("--machine_type", help="worker machine type (default: the one that fits the accelerator)")
    parser.add_argument("--disk_size_gb", type=int, help="worker boot disk (default 100: the image and model)")
    parser.add_argument("--harness_threads", type=int, default=1,
                        help="bundles processed at once per worker (one model per worker either way)")
    parser.add_argument("--max_num_workers", type=int, help="upper bound for autoscaling")
    parser.add_argument("--job_name", help="Dataflow job name")
    parser.add_argument("--dry_run", nargs="?", const="true", default="false", type=_boolean,
                        help="build the whole job offline, print it as JSON, submit nothing (Beam's spelling "
                             "--dry_run=True works too)")
    parser.add_argument("--job_file", help="with --dry_run: also write the job JSON to this local file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        flags = build_flags(
            args.target, project=args.project, region=args.region, temp_location=args.temp_location,
            staging_location=args.staging_location, output=args.output, image=args.image,
            gpu_type=args.gpu_type, gpu_count=args.gpu_count, nvidia_driver=args.nvidia_driver,
            tpu_type=args.tpu_type, tpu_topology=args.tpu_topology, machine_type=args.machine_type,
            disk_size_gb=args.disk_size_gb, harness_threads=args.harness_threads,
            max_num_workers=args.max_num_workers, job_name=args.job_name, dry_run=args.dry_run, extra=extra)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.dry_run:
        from pipeline.run import main as run_main

        _LOG.warning("python -m pipeline.run %s", " ".join(flags))
        return run_main(flags)

    logging.basicConfig(level=logging.WARNING)
    try:
        job = dry_run_job(flags)
    except ValueError as err:  # OptionError and Beam's option validation
        print(f"error: {err}", file=sys.stderr)
        return 2
    description = job_description(job)
    text = json.dumps(description, indent=1, sort_keys=True)
    if args.job_file:
        with open(args.job_file, "w", encoding="utf-8") as handle:
            handle.write(text)
    print(text)
    print(f"dry run: Dataflow job {description.get('name')} built for {args.target} and not submitted",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
