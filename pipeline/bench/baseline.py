"""Path (c), the baseline: transformers' PyTorch Qwen2 on the same weights and batches, its hidden states copied to
host with `.cpu()` and written by the pipeline's own `ShardWriter`, one step after the other."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.bench.inputs import bench_samples, flush_tree
from pipeline.bench.settings import HOOK, BenchError
from pipeline.bench.timing import Stopwatch, time_steps


def choose_baseline_device(setting: str, jax_platform: str) -> tuple[Optional[str], Optional[str]]:
    """(torch device, reason when skipped)."""
    import torch

    if setting == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--baseline_device=cuda but torch sees no CUDA device (torch "
                             f"{torch.__version__}); install a CUDA build of torch or pass --skip_baseline")
        return "cuda", None
    if setting == "cpu":
        return "cpu", None
    if torch.cuda.is_available():
        return "cuda", None
    if jax_platform == "cpu":
        return "cpu", None
    return None, (f"JAX runs on {jax_platform} but torch has no accelerator here: a CPU baseline would not be "
                  "comparable (pass --baseline_device=cpu to run it anyway)")


def build_reference_model(config, dtype: str, device: str, seed: int):
    """transformers' Qwen2ForCausalLM of `config` with random weights, SDPA attention, on `device`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    hf_config = Qwen2Config(**fields)
    hf_config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    # Initialised on the device itself: a large model initialised on CPU and then moved would take minutes.
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(hf_config, attn_implementation="sdpa",
                                              dtype=getattr(torch, dtype))
    return model.eval()


def save_checkpoint(model, directory: Path) -> Path:
    """safetensors weights + config.json + the Qwen2.5 tokenizer: what `load_model` and the pipeline read."""
    from model.tokenizer import write_qwen25_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    write_qwen25_tokenizer(directory)
    return directory


def torch_to_numpy(tensor):
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class TorchDevice:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> Optional[int]:
        return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None

    def empty_cache(self):
        if self.cuda:
            self.torch.cuda.empty_cache()

    def ids(self, batch):
        return self.torch.from_numpy(batch[0]).to(self.device, dtype=self.torch.long, non_blocking=True)


def baseline_forward(model, device: TorchDevice, batches, warmup: int) -> dict:
    """transformers' forward through every layer (Qwen2Model, no LM head, no hidden states kept); torch queues
    the batches and each group is waited for once at its end."""
    device.reset_peak()
    with device.torch.inference_mode():
        timing = time_steps(batches, warmup, lambda batch: model.model(input_ids=device.ids(batch), use_cache=False),
                            finish=device.sync)
    return {"forward_tok_s": timing.tok_s, "forward_s": timing.seconds, "first_call_s": timing.first_s,
            "steps": timing.steps, "peak_device_bytes": device.peak_bytes()}


def baseline_copy_and_write(model, device: TorchDevice, batches, warmup: int, layers, write_batches: int,
                            out_dir: Path, model_name: str, dtype: str) -> dict:
    """output_hidden_states=True, the requested layers copied to host with .cpu(), then (for the first
    `write_batches` timed batches) written by transforms.write.ShardWriter, one step after the other as a
    plain transformers script would. hidden_states[l + 1] is the output of layer l (transformers' last entry
    is the final-normed value; the bytes moved and written are the same)."""
    from model.dtypes import transfer_dtype
    from transforms.write import ShardWriter

    storage = dtype  # what the pipeline stores by default (--activation_dtype=auto): the compute dtype, exactly
    writer = ShardWriter(str(out_dir), "base", model_name, dtype, storage)
    tokens_per_batch = batches[0][0].size
    assert transfer_dtype(dtype, storage) == dtype  # what crosses to host is the compute dtype, as for ours
    device.reset_peak()
    copy, write = Stopwatch(), Stopwatch()
    written = {"tokens": 0, "bytes": 0}
    first_rows = None
    with device.torch.inference_mode():
        for index, batch in enumerate(batches):
            timed = index >= 1 + warmup
            with (copy if timed else Stopwatch()).running():
                out = model.model(input_ids=device.ids(batch), output_hidden_states=True, use_cache=False)
                host = [out.hidden_states[layer + 1].cpu() for layer in layers]
                del out
            if first_rows is None:
                # Copies, so the whole first batch is not kept alive through a view.
                first_rows = {layer: torch_to_numpy(h[0]).copy() for layer, h in zip(layers, host)}
            if timed and index - (1 + warmup) < write_batches:
                with write.running():
                    samples, placements = bench_samples(batch[0], index)
                    activations = {(HOOK, layer): torch_to_numpy(h).reshape(tokens_per_batch, -1)
                                   for layer, h in zip(layers, host)}
                    summary = writer.write_shard(f"{index:016x}", samples, placements, activations)
                written["tokens"] += summary["tokens"]
                written["bytes"] += summary["bytes"]
    with write.running():
        flush_tree(out_dir)  # the page cache must not flatter the baseline's writes any more than the pipeline's
    steps = len(batches) - 1 - warmup
    return {**_copy_write_rates(copy.seconds, write.seconds, tokens_per_batch * steps, written),
            "write_steps": min(write_batches, steps), "steps": steps, "peak_device_bytes_copy": device.peak_bytes(),
            "_first_rows": first_rows}


def _copy_write_rates(copy_s: float, write_s: float, copied_tokens: int, written: dict) -> dict:
    copy_rate = copied_tokens / copy_s
    write_rate = None
    if written["tokens"]:
        # forward + copy + write, one after the other: per-token copy time plus per-token write time.
        write_rate = 1.0 / (1.0 / copy_rate + write_s / written["tokens"])
    return {"copy_tok_s": copy_rate, "copy_s": copy_s, "write_tok_s": write_rate, "write_s": write_s,
            "written_tokens": written["tokens"], "bytes_written": written["bytes"],
            "write_bytes_per_s": written["bytes"] / write_s if write_s and written["bytes"] else None}
