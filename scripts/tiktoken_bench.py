"""Encode throughput of Python tiktoken with the merges of our trained tokenizer.

Usage: TIKTOKEN_RANKS=/tmp/tk cargo bench -p prepare --features build
       python3 scripts/tiktoken_bench.py /tmp/tk
Reads tokenizer.json (HF byte-level BPE) and text.txt written by the bench, builds a tiktoken
Encoding with the same ranks and split pattern, and prints MB/s and its token count (which
should match ours: same merges, same pattern).
"""
import json
import sys
import time

import tiktoken


def byte_decoder():
    # GPT-2's byte <-> printable-character table used by byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def main(folder):
    tok = json.load(open(f"{folder}/tokenizer.json"))
    dec = byte_decoder()
    ranks = {bytes(dec[c] for c in piece): rank for piece, rank in tok["model"]["vocab"].items()}
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    pattern = tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    enc = tiktoken.Encoding("ours", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    docs = open(f"{folder}/text.txt", encoding="utf-8").read().split("\n\x00")  # one blob is fine
    text = docs[0]
    nbytes = len(text.encode("utf-8"))
    t = time.time()
    n = len(enc.encode_ordinary(text))
    one = nbytes / (time.time() - t) / 1e6
    chunks = text.split("\nThe ")
    t = time.time()
    batch = enc.encode_ordinary_batch(chunks, num_threads=2)
    par = nbytes / (time.time() - t) / 1e6
    print(f"tiktoken {tiktoken.__version__}: {one:.1f} MB/s one thread, {par:.1f} MB/s 2 threads; "
          f"{n} tokens (ours: {open(f'{folder}/tokens.txt').read().strip()})")


if __name__ == "__main__":
    main(sys.argv[1])
