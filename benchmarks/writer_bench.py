"""Where the shard writer's CPU goes, per activation file, step by step.

    python benchmarks/writer_bench.py [--tokens 16384] [--d_model 896] [--repeats 7] [--values normal]

Builds one activation table as `ShardWriter` does (`transforms.write.activation_table`, bfloat16) and times, in
one process, round-robin so all steps see the same load: encoding it to Parquet as the format does
(`output_format.parquet_bytes`, page checksums on), the same encoding without page checksums (what the page CRCs
cost the writer), sha256 of the encoded bytes (what the commit marker records) and writing them to a temporary
file on local disk as the writer uploads (`transforms.write._upload`, Beam's FileSystems). Statistics are
measured by benchmarks/stats_bench.py. Reports medians of wall and process CPU microseconds per token; prints
one JSON line; results feed docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.storage_bench import make_samples, make_values  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d_model", type=int, default=896)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--values", default="normal", help="normal or checkpoint-like (benchmarks/storage_bench.py)")
    args = parser.parse_args(argv)

    from transforms import output_format as fmt
    from transforms.write import _upload, activation_table

    rng = np.random.default_rng(1)
    samples, placements = make_samples(args.tokens, rng)
    values = make_values(args.values, args.tokens, args.d_model, rng)
    table = activation_table(samples, placements, values, "resid_post", 0, "bfloat16")
    rows = fmt.row_group_rows(args.d_model, "bfloat16")
    encoded = fmt.parquet_bytes(table, vector_columns=(fmt.ACTIVATION_COLUMN,), row_group_size=rows)
    others = [name for name in table.column_names if name != fmt.ACTIVATION_COLUMN]

    def without_page_checksums():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=rows, write_page_checksum=False, use_dictionary=others,
                       write_statistics=others, compression={name: "zstd" if name in others else "none"
                                                             for name in table.column_names},
                       compression_level={name: fmt.ZSTD_LEVEL for name in others})
        return sink.getvalue()

    with tempfile.TemporaryDirectory() as root:
        steps = {
            "encode": lambda: fmt.parquet_bytes(table, vector_columns=(fmt.ACTIVATION_COLUMN,), row_group_size=rows),
            "encode_without_page_checksums": without_page_checksums,
            "sha256": lambda: hashlib.sha256(memoryview(encoded)).hexdigest(),
            "write_file": lambda: _upload(encoded, os.path.join(root, "file.parquet")),
        }
        times = {name: [] for name in steps}
        for round_ in range(args.repeats + 1):
            for name, step in steps.items():
                wall, cpu = time.perf_counter(), time.process_time()
                step()
                if round_:  # the first round warms up
                    times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    per_token = {name: {"wall_us": round(statistics.median(w for w, _ in t) / args.tokens * 1e6, 3),
                        "cpu_us": round(statistics.median(c for _, c in t) / args.tokens * 1e6, 3)}
                 for name, t in times.items()}
    print(json.dumps({"tokens": args.tokens, "d_model": args.d_model, "values": args.values,
                      "file_bytes": encoded.size, "load_average": os.getloadavg(), "us_per_token": per_token}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
