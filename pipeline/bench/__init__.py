"""`python -m pipeline.bench`: our extractor, the whole pipeline and the transformers baseline, side by side; or,
with `--host_ceiling`, the pipeline's host side alone with the model's forward replaced by a device-free source.

One process, on whatever accelerator is present, on the same random weights and the same token batches:

(a) ours (`ours.py`): the jitted `HookedQwen.capture` on fixed-shape random token batches, batch n+1 dispatched
    before batch n is fetched (as transforms/extract.py does), once as a bare forward (every layer, result left on
    the device) and once copying the requested hooks to host;
(b) pipeline (`end_to_end.py`): `pipeline.run.main` on the local runner, reading a synthetic text corpus of about
    the same token count and writing Parquet to local disk (the real product, not a re-implementation of its DoFns);
(c) baseline (`baseline.py`): transformers' PyTorch Qwen2 (bf16 on GPU, float32 on CPU, SDPA attention) with
    `output_hidden_states=True`, the requested layers copied to host with `.cpu()`, then written by the same
    Parquet writer the pipeline uses.

Same weights: the transformers model is built first with random weights, saved once as a safetensors checkpoint
(with the real Qwen2.5 tokenizer) into a work folder, and that checkpoint is what ours and the pipeline load. Each
framework holds the weights once at a time: the baseline runs and frees its model before JAX loads the checkpoint,
and our model is freed before the pipeline loads its own copy.

The disk's own sequential write bandwidth is measured in the same run (fsync'd), so the all-layer target (a share
of that bandwidth) is checkable. Every path is timed through `timing.py`. Results print as a table and go to
OUTPUT_DIR/bench-<time>.json with every target marked pass / fail / not run (`report.py`). `--smoke` runs every
path on CPU with the tiny geometry in seconds. Flags: `settings.py`; the run's order: `driver.py`.
"""
