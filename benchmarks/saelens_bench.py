"""What the SAELens training loop sees of the loader's rate, on one output (e.g. one written by loader_bench.py):

    python benchmarks/loader_bench.py write /tmp/loader-out --tokens 200000
    python benchmarks/saelens_bench.py /tmp/loader-out --steps 30 --d_sae 3584 --k 64

Measures, in one process: (1) the loader alone, `ds.torch_iterable` through a DataLoader (`--num_workers`),
shuffled float32 batches, `--steps` batches after one warm-up batch; (2) SAELens's `SAETrainer.fit` on a
`TopKTrainingSAE` for `--steps` steps from the same kind of iterator, with the time spent waiting for the next batch
counted apart. Reports tokens/s of both, their ratio (the fraction of the loader's rate the training loop
achieves) and the share of the loop's time spent waiting for data. Without an accelerator the SAE's own compute
dominates; the waiting share is the figure that carries over.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--hook", default="resid_post")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--d_sae", type=int, default=None, help="default: 4 x d_model")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the SAE")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")

    import torch

    from pipeline.dataset import open_activations

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = open_activations(args.root)

    def batches(seed):
        return iter(torch.utils.data.DataLoader(
            ds.torch_iterable(args.hook, args.layer, args.batch_tokens, seed=seed, epochs=None),
            batch_size=None, num_workers=args.num_workers))

    loader = batches(1)
    next(loader)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(loader)
    loader_s = time.perf_counter() - started
    del loader

    d_sae, loop_s, waited_s = _train(args, ds.d_model, batches(2))
    tokens = args.steps * args.batch_tokens
    print(json.dumps({
        "d_model": ds.d_model, "d_sae": d_sae, "k": args.k, "batch_tokens": args.batch_tokens,
        "steps": args.steps, "num_workers": args.num_workers, "torch_threads": torch.get_num_threads(),
        "loader_tok_s": round(tokens / loader_s), "loop_tok_s": round(tokens / loop_s),
        "fraction_of_loader_rate": round(loader_s / loop_s, 4), "loop_s": round(loop_s, 2),
        "waiting_for_data_s": round(waited_s, 2), "waiting_share_of_loop": round(waited_s / loop_s, 4),
        "load_average": os.getloadavg()}))
    return 0


def _train(args, d_model: int, source) -> tuple[int, float, float]:
    """A TopK SAE trained for args.steps batches from `source`: (d_sae, seconds of the loop, seconds of them
    spent waiting for data)."""
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    waited = [0.0]

    def provider(source):
        while True:
            before = time.perf_counter()
            batch = next(source)
            waited[0] += time.perf_counter() - before
            yield batch

    next(source)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_model, d_sae=args.d_sae or 4 * d_model, k=args.k))
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch_tokens,
                           train_batch_size_samples=args.batch_tokens, lr=3e-4, lr_end=3e-4, device="cpu",
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg, sae, provider(source))
    started = time.perf_counter()
    trainer.fit()
    return sae.cfg.d_sae, time.perf_counter() - started, waited[0]


if __name__ == "__main__":
    sys.exit(main())
