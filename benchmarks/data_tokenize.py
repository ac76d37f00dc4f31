"""Tokenising preference pairs at scale: pairs/s, cores used and peak memory, against the one-pair-at-a-time path.

    PYTHONPATH=src python benchmarks/data_tokenize.py            # 100k pairs (a few minutes on 2 cores)
    PYTHONPATH=src python benchmarks/data_tokenize.py --pairs 20000

Writes a synthetic JSONL of N pairs (prompts ~30 words, responses ~40 words), then runs each measurement in a
fresh process so peak RSS belongs to that measurement alone:
  batched   preftune.data.load_pairs: streamed chunks, one batched (multi-core) tokenizer call per chunk,
            int32 arrays out; at N and at N/4 pairs, to show memory grows with the compact output only
  cached    the same call again: a cache hit
  one-by-one  tokenize_pair per record into Python lists (the foundation's path), on N/10 pairs
The tokenizer is GPT-2's real BPE (built from openai-whisper's asset file, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of and to in is it that was for on are with as his they be at one have this from or had by hot "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has "
         "look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three "
         "want air well also play small end put home read hand port large spell add even land here must big high "
         "such follow act why ask men change went light kind off need house picture try us again animal point "
         "mother world near build self earth father head stand own page should country found answer school grow "
         "study still learn plant cover food sun four between state keep eye never last let thought city tree "
         "cross farm hard start might story saw far sea draw left late run don't while press close night real "
         "life few north open seem together next white children begin got walk example ease paper group always "
         "music those both mark often letter until mile river car feet care second book carry took science eat "
         "room friend began idea fish mountain stop once base hear horse cut sure watch colour face wood main").split()


def write_pairs(path: Path, n: int) -> None:
    rng = random.Random(0)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": sentence(rng.randint(15, 45)) + " ", "chosen": sentence(rng.randint(20, 60)),
                                "rejected": sentence(rng.randint(20, 60))}) + "\n")


def worker(mode: str, path: str, n: int, cache: str) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from real_tokenizers import gpt2_tokenizer

    from preftune import data
    from preftune.config import DataConfig

    tokenizer = gpt2_tokenizer()
    cfg = DataConfig(max_samples=n)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, t0 = time.process_time(), time.perf_counter()
    if mode == "one-by-one":
        pairs = [data.tokenize_pair(r, tokenizer, cfg)[0] for r in data.read_jsonl(path)[:n]]
    else:
        pairs, report = data.load_pairs(path, tokenizer, cfg, cache_dir=cache)
        assert report.cached == (mode == "cached")
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "pairs": len(pairs), "seconds": round(wall, 2), "pairs_per_s": round(len(pairs) / wall),
            "cpu_per_wall": round(cpu / wall, 2), "peak_rss_mb": round(peak / 1024),
            "rss_growth_mb": round((peak - rss_before) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "PATH", "N", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, path, n, cache = args.worker
        print(json.dumps(worker(mode, path, int(n), cache)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        write_pairs(path, args.pairs)
        print(f"{args.pairs} synthetic pairs, {path.stat().st_size / 1e6:.0f} MB of JSONL; tokenizer: GPT-2 BPE")
        runs = [("batched", args.pairs // 4), ("batched", args.pairs), ("cached", args.pairs),
                ("one-by-one", args.pairs // 10)]
        results = []
        for mode, n in runs:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(path), str(n), f"{tmp}/cache"],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.splitlines()[-1]))
            r = results[-1]
            print(f"{r['mode']:<11} {r['pairs']:>7} pairs  {r['seconds']:>7.2f} s  {r['pairs_per_s']:>7} pairs/s  "
                  f"cpu/wall {r['cpu_per_wall']:.2f}  peak RSS {r['peak_rss_mb']} MB "
                  f"(+{r['rss_growth_mb']} MB while loading)")
        batched, one = results[1], results[3]
        print(f"batched vs one-by-one: {batched['pairs_per_s'] / one['pairs_per_s']:.1f}x pairs/s")


if __name__ == "__main__":
    main()
