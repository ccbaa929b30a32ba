"""The two places this project reaches into Apache Beam internals, kept together.

Written for apache-beam 2.77. On an upgrade, check that:
- `fn_runner.FnApiRunner(provision_info=...)`, `fn_runner.ExtendedProvisionInfo` and
  `JobServiceHandle.encode_pipeline_options` still exist with these signatures (local_runner), and that
  `--runner=DirectRunner` still tries Prism first (if it no longer does, local_runner may go);
- `apache_beam.options.pipeline_options._BeamArgumentParser` still exists and PipelineOptions subclasses still
  register their flags through `_add_argparse_args` (flag_parser).
tests/test_run_options.py and tests/test_end_to_end.py fail if either breaks.
"""
from __future__ import annotations

import argparse


def local_runner(options):
    """The in-process portable runner behind --runner=DirectRunner, without Beam's first try of Prism (which
    downloads a binary from GitHub and stalls offline). It honours --direct_num_workers and --direct_running_mode
    like the DirectRunner does."""
    # TODO(https://github.com/apache/beam/issues/34549): drop once DirectRunner no longer fetches Prism first.
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def flag_parser(error_type: type[Exception]) -> argparse.ArgumentParser:
    """A parser that knows every flag of every PipelineOptions class (Beam's and ours) and raises `error_type`
    instead of exiting, so unknown flags can be reported: Beam itself only warns about them."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    class _RaisingParser(_BeamArgumentParser):
        def error(self, message):
            raise error_type(message)

    parser = _RaisingParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
    return parser
