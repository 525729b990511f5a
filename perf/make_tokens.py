"""Tokenize the shared corpora into one flat uint16 token file for GPU runs (the device has no ../shared).

python perf/make_tokens.py ../shared/data/corpus .perfdata/tokens.npy 3400000
Documents are joined with EOS, BOS at each start, like pretraining; sources are interleaved by document.
"""

import io
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import zstandard

from tinyllama.tokenizer import Tokenizer


def jsonl_zst(path):
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            if line.strip():
                yield json.loads(line)["text"]


def main(corpus, out, limit):
    tok = Tokenizer()
    sources = [jsonl_zst(f"{corpus}/sotu_1790_1999.jsonl.zst"), jsonl_zst(f"{corpus}/moby_dick.jsonl.zst"),
               iter(pq.read_table(f"{corpus}/cpython_stdlib.parquet", columns=["content"]).column("content").to_pylist())]
    ids, n, alive = [], 0, list(sources)
    while n < limit and alive:
        for src in list(alive):
            try:
                text = next(src)
            except StopIteration:
                alive.remove(src)
                continue
            t = tok.encode(text, bos=True, eos=True)
            ids.append(np.asarray(t, dtype=np.uint16))
            n += len(t)
    arr = np.concatenate(ids)[:limit]
    np.save(out, arr)
    print(f"{out}: {arr.size} tokens")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
