"""The pipeline on TPU VMs: every host of a slice, or N (preemptible) single-host TPU VMs, one GCS output.

Each host runs the whole pipeline in-process (``python -m pipeline.run --runner=DirectRunner``) on its share of the
input (``--num_hosts=N --host_index=i``, see transforms/shares.py) with ``--resume``, so a host that restarts
recomputes only what it had not committed. No host talks to another: the shares are a pure function of the
record ids, and shard names carry the host index.

Sub-commands (each prints the gcloud commands it would run; ``--execute`` runs them):

``vms``      N single-host TPU VMs named PREFIX-0 .. PREFIX-(N-1). Each VM gets a startup script that installs
             the project and runs its share, so a VM that is recreated after a preemption resumes by itself.
             With ``--execute`` the launcher then supervises: it recreates preempted or failed VMs and returns
             when every host has written its done marker (OUTPUT/_hosts/host-III-of-NNN.done).
``slice``    one (multi-host) TPU slice: ``gcloud compute tpus tpu-vm ssh --worker=all`` runs the same command on
             every host, which reads its own index from the TPU metadata (agent-worker-number).
``host``     runs on a TPU VM: the restart loop around one host's share (``--max_attempts`` fresh processes,
             each with ``--resume``), then the done marker.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

from launch import launcher_parser

_LOG = logging.getLogger("launch.tpu_vm")

# Flags the launcher sets for every host; a second value among the pipeline flags would split the run.
OWNED_FLAGS = ("--runner", "--num_hosts", "--host_index", "--output", "--resume")

# TPU software versions (gcloud --version) per accelerator family, from the Cloud TPU runtime-versions page.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"

# VM states (Cloud TPU API Node.State) after which a VM never comes back by itself: delete and recreate it.
DEAD_STATES = {"PREEMPTED", "TERMINATED", "STOPPED"}
WAIT_STATES = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "STOPPING", "DELETING"}


class LaunchError(ValueError):
    """A TPU-VM launch option that cannot work; the message names it and says what to do."""


def _check_output(output: str | None) -> None:
    if not output or not re.fullmatch(r"gs://[a-z0-9][-_a-z0-9.]+[a-z0-9](/.*)?", output):
        raise LaunchError(
            f"--output={output!r} must be a gs://bucket/path: every host writes its shards into the same output")


def _check_hosts(num_hosts: int, host_index: int | None = None) -> None:
    if num_hosts < 1:
        raise LaunchError(f"--num_hosts must be at least 1, got {num_hosts}")
    if host_index is not None and not 0 <= host_index < num_hosts:
        raise LaunchError(f"--host_index={host_index} is out of range for --num_hosts={num_hosts}: "
                          f"use 0..{num_hosts - 1}")


def _check_pipeline_args(pipeline_args: Sequence[str]) -> None:
    names = {arg.split("=", 1)[0] for arg in pipeline_args}
    clashes = sorted(names & set(OWNED_FLAGS))
    if clashes:
        raise LaunchError(
            f"{', '.join(clashes)}: set by the TPU-VM launcher for every host (--num_hosts/--output are its own "
            "options; --runner=DirectRunner and --resume always); leave them out of the pipeline flags")


def host_pipeline_argv(pipeline_args: Sequence[str], *, host_index: int, num_hosts: int, output: str,
                       python: str = "python3") -> list[str]:
    """The command one host runs for its share: the in-process runner, its share, always --resume."""
    _check_output(output)
    _check_hosts(num_hosts, host_index)
    _check_pipeline_args(pipeline_args)
    return [python, "-m", "pipeline.run", "--runner=DirectRunner", f"--num_hosts={num_hosts}",
            f"--host_index={host_index}", f"--output={output}", "--resume", *pipeline_args]


def done_marker(output: str, host_index: int, num_hosts: int) -> str:
    return f"{output.rstrip('/')}/_hosts/host-{host_index:03d}-of-{num_hosts:03d}.done"


def failed_marker(output: str, host_index: int, num_hosts: int) -> str:
    return f"{output.rstrip('/')}/_hosts/host-{host_index:03d}-of-{num_hosts:03d}.failed"


# --- on the TPU VM -----------------------------------------------------------------------------------------------

def metadata_host_index(fetch: Callable[[str], str] | None = None) -> int:
    """This TPU VM's worker number within its slice, from the TPU metadata attribute agent-worker-number."""
    def default_fetch(key: str) -> str:
        request = urllib.request.Request(METADATA_URL + key, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    text = (fetch or default_fetch)("agent-worker-number").strip()
    if not text.isdigit():
        raise LaunchError(f"TPU metadata agent-worker-number is {text!r}, not a worker number: pass --host_index")
    return int(text)


@dataclass
class HostOutcome:
    attempts: int
    returncodes: list[int] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return bool(self.returncodes) and self.returncodes[-1] == 0


def run_host(argv: Sequence[str], *, max_attempts: int, backoff_seconds: float = 30.0,
             run: Callable[[Sequence[str]], int] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> HostOutcome:
    """Runs one host's pipeline until it succeeds, at most `max_attempts` fresh processes.

    A fresh process per attempt, because a crashed attempt may leave the accelerator or JAX in a bad state; every
    attempt carries --resume, so it only computes what the previous ones did not commit. Usage errors (exit 2:
    a bad option) are not retried: they fail the same way every time."""
    if max_attempts < 1:
        raise LaunchError(f"--max_attempts must be at least 1, got {max_attempts}")
    run = run or (lambda args: subprocess.call(list(args)))
    outcome = HostOutcome(attempts=0)
    for attempt in range(1, max_attempts + 1):
        outcome.attempts = attempt
        code = run(argv)
        outcome.returncodes.append(code)
        if code == 0:
            return outcome
        if code == 2:
            _LOG.error("attempt %d exited 2 (an option error): not retrying", attempt)
            return outcome
        if attempt < max_attempts:
            wait = backoff_seconds * 2 ** (attempt - 1)
            _LOG.warning("attempt %d/%d exited %d; resuming in %.0f s", attempt, max_attempts, code, wait)
            sleep(wait)
    return outcome


def write_host_marker(output: str, host_index: int, num_hosts: int, outcome: HostOutcome) -> str:
    """OUTPUT/_hosts/host-III-of-NNN.done (or .failed): how this host's share ended, for the supervisor."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.storage import use_storage_emulator_if_configured

    use_storage_emulator_if_configured()
    done = done_marker(output, host_index, num_hosts)
    failed = failed_marker(output, host_index, num_hosts)
    path, stale = (done, failed) if outcome.succeeded else (failed, done)
    if FileSystems.exists(stale):
        FileSystems.delete([stale])
    body = {"host_index": host_index, "num_hosts": num_hosts, "attempts": outcome.attempts,
            "returncodes": outcome.returncodes, "finished": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(body).encode())
    return path


# --- gcloud commands ---------------------------------------------------------------------------------------------

def runtime_version(accelerator_type: str) -> str:
    family = accelerator_type.rsplit("-", 1)[0]
    try:
        return RUNTIME_VERSIONS[family]
    except KeyError:
        raise LaunchError(
            f"no default TPU software version for --accelerator_type={accelerator_type}: pass --runtime_version "
            f"(known families: {', '.join(RUNTIME_VERSIONS)})") from None


@dataclass(frozen=True)
class TpuTarget:
    zone: str
    accelerator_type: str
    project: str | None = None
    runtime_version: str | None = None
    spot: bool = True

    def common(self) -> list[str]:
        flags = [f"--zone={self.zone}"]
        if self.project:
            flags.append(f"--project={self.project}")
        return flags

    def create(self, name: str, startup_script: str | None = None) -> list[str]:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", name, *self.common(),
                f"--accelerator-type={self.accelerator_type}",
                f"--version={self.runtime_version or runtime_version(self.accelerator_type)}"]
        if self.spot:
            argv.append("--spot")
        if startup_script:
            argv.append(f"--metadata-from-file=startup-script={startup_script}")
        return argv

    def describe_state(self, name: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", name, *self.common(), "--format=value(state)"]

    def delete(self, name: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *self.common(), "--quiet"]

    def ssh_all(self, name: str, command: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *self.common(), "--worker=all",
                f"--command={command}"]


def install_commands(package: str) -> list[str]:
    """Shell lines that install the project with JAX for TPU on a fresh TPU VM."""
    if package.startswith("gs://"):
        local = "/tmp/" + package.rsplit("/", 1)[-1]
        return [f"gcloud storage cp {shlex.quote(package)} {shlex.quote(local)}",
                f"python3 -m pip install --quiet {shlex.quote(local + '[tpu]')}"]
    return [f"python3 -m pip install --quiet {shlex.quote(package)}"]


def host_shell_command(pipeline_args: Sequence[str], *, num_hosts: int, output: str, host_index: int | None,
                       max_attempts: int, package: str | None) -> str:
    """The shell line a host runs: install, then the restart loop (python -m launch.tpu_vm host ...)."""
    _check_output(output)
    _check_hosts(num_hosts, host_index)
    _check_pipeline_args(pipeline_args)
    host = [
        "python3", "-m", "launch.tpu_vm", "host", f"--num_hosts={num_hosts}", f"--output={output}",
        f"--host_index={'auto' if host_index is None else host_index}", f"--max_attempts={max_attempts}", "--",
        *pipeline_args]
    lines = install_commands(package) if package else []
    lines.append(shlex.join(host))
    return " && ".join(lines)


def startup_script(host_command: str, log_path: str = "/var/log/arc-activations.log") -> str:
    """A VM startup script: runs at every boot, so a recreated VM picks its share up again by itself."""
    return "\n".join([
        "#!/bin/bash",
        "# arc-activations host: generated by python -m launch.tpu_vm; runs at every boot of this TPU VM.",
        "set -uo pipefail",
        f"( {host_command} ) >> {shlex.quote(log_path)} 2>&1",
        "",
    ])


def vm_names(prefix: str, num_vms: int) -> list[str]:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?", prefix):
        raise LaunchError(f"--name={prefix!r}: TPU names are lower case letters, digits and hyphens")
    return [f"{prefix}-{i}" for i in range(num_vms)]


# --- supervisor for N single-host VMs ----------------------------------------------------------------------------

@dataclass
class Supervisor:
    """Keeps N TPU VMs alive until every host has written its done marker.

    `run(argv) -> (returncode, stdout)` runs gcloud; `exists(path)` checks a done marker; both are injectable so the
    loop is tested without a cloud."""

    target: TpuTarget
    names: list[str]
    output: str
    scripts: list[str]
    run: Callable[[Sequence[str]], tuple[int, str]]
    exists: Callable[[str], bool]
    max_recreations: int = 20
    poll_seconds: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    recreations: dict[str, int] = field(default_factory=dict)

    def state(self, name: str) -> str:
        code, out = self.run(self.target.describe_state(name))
        return out.strip().upper() if code == 0 and out.strip() else "NOT_FOUND"

    def _create(self, name: str, script: str) -> None:
        code, out = self.run(self.target.create(name, script))
        if code != 0:
            _LOG.warning("create %s failed (%d): %s", name, code, out.strip()[-500:])

    def step(self) -> bool:
        """One pass over the hosts; True once every host is done."""
        num_hosts = len(self.names)
        all_done = True
        for index, (name, script) in enumerate(zip(self.names, self.scripts)):
            if self.exists(done_marker(self.output, index, num_hosts)):
                continue
            all_done = False
            failed = failed_marker(self.output, index, num_hosts)
            if self.exists(failed):
                # Every attempt of that boot failed, which a preemption does not cause: a bug or a bad option.
                raise RuntimeError(
                    f"host {index} ({name}) gave up: see {failed} and /var/log/arc-activations.log on the VM; "
                    "fix the cause, delete the marker and run the launcher again (finished work is kept)")
            state = self.state(name)
            if state in DEAD_STATES or state == "NOT_FOUND":
                count = self.recreations.get(name, 0)
                if state != "NOT_FOUND":
                    if count >= self.max_recreations:
                        raise RuntimeError(
                            f"{name} is {state} after {count} recreations: giving up (raise --max_recreations, or "
                            "look at /var/log/arc-activations.log on the VM)")
                    self.recreations[name] = count + 1
                    _LOG.warning("%s is %s: deleting and recreating it (%d)", name, state, count + 1)
                    self.run(self.target.delete(name))
                self._create(name, script)
        return all_done

    def supervise(self) -> None:
        while not self.step():
            self.sleep(self.poll_seconds)


def _gcloud(argv: Sequence[str]) -> tuple[int, str]:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    return done.returncode, done.stdout if done.returncode == 0 else done.stderr


def _gcs_exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


# --- command line ------------------------------------------------------------------------------------------------

def _int_or_auto(text: str):
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a host index or 'auto', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = launcher_parser(
        "tpu_vm", "Run the pipeline on TPU VMs, each host on its share of the input, into one gs:// output. "
                  "Pipeline flags (--model, --dataset, --layers, ...) go after `--`.",
        "docs/launch.md walks through both set-ups.")
    commands = parser.add_subparsers(dest="command", required=True)

    def cloud(sub):
        sub.add_argument("--zone", required=True, help="TPU zone, e.g. us-west4-a")
        sub.add_argument("--project", help="Google Cloud project (default: gcloud's)")
        sub.add_argument("--accelerator_type", required=True, help="e.g. v5litepod-8, v6e-8, v4-8")
        sub.add_argument("--runtime_version", help="TPU software version (default: by accelerator family)")
        sub.add_argument("--output", required=True, help="gs:// output root shared by every host")
        sub.add_argument("--package", help="what each host pip-installs: a gs:// wheel of this project (installed "
                                           "with its tpu extra), or a pip requirement that names the extra, e.g. "
                                           "'arc-activations[tpu] @ git+https://...' (default: already installed)")
        sub.add_argument("--max_attempts", type=int, default=5, help="fresh processes per host boot")
        sub.add_argument("--execute", action="store_true", help="run the gcloud commands instead of printing")

    vms = commands.add_parser("vms", help="N single-host TPU VMs, recreated after preemption")
    cloud(vms)
    vms.add_argument("--name", required=True, help="VM name prefix: VMs are NAME-0 .. NAME-(N-1)")
    vms.add_argument("--num_vms", type=int, required=True, help="number of VMs (= hosts)")
    vms.add_argument("--on_demand", action="store_true", help="on-demand VMs instead of spot (preemptible)")
    vms.add_argument("--max_recreations", type=int, default=20, help="per VM, before giving up")
    vms.add_argument("--poll_seconds", type=float, default=60.0)
    vms.add_argument("--script_dir", help="where to write the startup scripts (default: a new temporary folder)")

    slice_ = commands.add_parser("slice", help="every host of one existing TPU slice (gcloud ssh --worker=all)")
    cloud(slice_)
    slice_.add_argument("--name", required=True, help="the TPU slice's name")
    slice_.add_argument("--num_hosts", type=int, required=True, help="hosts in the slice")

    host = commands.add_parser("host", help="on a TPU VM: one host's share with restarts, then its done marker")
    host.add_argument("--num_hosts", type=int, required=True)
    host.add_argument("--host_index", type=_int_or_auto, default=None,
                      help="this host's index, or auto: the TPU metadata's agent-worker-number")
    host.add_argument("--output", required=True)
    host.add_argument("--max_attempts", type=int, default=5)
    host.add_argument("--backoff_seconds", type=float, default=30.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, pipeline_args = argv[:split], argv[split + 1:]
    else:
        own, pipeline_args = argv, []
    args = _parser().parse_args(own)
    try:
        if args.command == "host":
            return _run_host(args, pipeline_args)
        target = TpuTarget(zone=args.zone, accelerator_type=args.accelerator_type, project=args.project,
                           runtime_version=args.runtime_version or runtime_version(args.accelerator_type),
                           spot=not getattr(args, "on_demand", False))
        if args.command == "slice":
            return _run_slice(args, target, pipeline_args)
        return _run_vms(args, target, pipeline_args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # the supervisor gave up on a host
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run_host(args, pipeline_args: list[str]) -> int:
    """`host`: this machine's share of the run, retried, then its done marker."""
    index = args.host_index if args.host_index is not None else metadata_host_index()
    command = host_pipeline_argv(pipeline_args, host_index=index, num_hosts=args.num_hosts,
                                 output=args.output, python=sys.executable)
    _LOG.info("host %d of %d: %s", index, args.num_hosts, shlex.join(command))
    outcome = run_host(command, max_attempts=args.max_attempts, backoff_seconds=args.backoff_seconds)
    marker = write_host_marker(args.output, index, args.num_hosts, outcome)
    if not outcome.succeeded:
        print(f"error: host {index} failed {outcome.attempts} time(s), exit codes {outcome.returncodes}; "
              f"see {marker}", file=sys.stderr)
        return outcome.returncodes[-1] or 1
    print(marker)
    return 0


def _run_slice(args, target: TpuTarget, pipeline_args: list[str]) -> int:
    """`slice`: one command on every host of a multi-host slice (printed unless --execute)."""
    line = host_shell_command(pipeline_args, num_hosts=args.num_hosts, output=args.output, host_index=None,
                              max_attempts=args.max_attempts, package=args.package)
    ssh = target.ssh_all(args.name, line)
    if not args.execute:
        print(shlex.join(ssh))
        return 0
    return subprocess.call(ssh)


def _run_vms(args, target: TpuTarget, pipeline_args: list[str]) -> int:
    """`vms`: one single-host VM per share with a startup script (printed unless --execute), supervised until
    every host is done, then one final manifest."""
    names = vm_names(args.name, args.num_vms)
    lines = [host_shell_command(pipeline_args, num_hosts=len(names), output=args.output, host_index=index,
                                max_attempts=args.max_attempts, package=args.package)
             for index in range(len(names))]
    script_dir = args.script_dir or tempfile.mkdtemp(prefix="arc-activations-startup-")
    scripts = []
    for name, line in zip(names, lines):
        path = f"{script_dir}/{name}.sh"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(startup_script(line))
        scripts.append(path)
    if not args.execute:
        for name, path in zip(names, scripts):
            print(shlex.join(target.create(name, path)))
        print(f"# startup scripts in {script_dir}; --execute creates the VMs and recreates preempted ones "
              f"until every host has written {done_marker(args.output, 0, len(names)).replace('000-of', 'III-of')}")
        return 0
    Supervisor(target=target, names=names, output=args.output, scripts=scripts, run=_gcloud,
               exists=_gcs_exists, max_recreations=args.max_recreations,
               poll_seconds=args.poll_seconds).supervise()
    from pipeline.manifest import rebuild_manifest

    # Hosts finishing together can each miss the other's last shards in their manifest: one final rebuild.
    counts = rebuild_manifest(args.output)["counts"]
    print(f"all {len(names)} hosts done: {args.output} ({counts['samples']} samples, {counts['tokens']} tokens)")
    for name in names:
        _LOG.info("delete with: %s", shlex.join(target.delete(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
