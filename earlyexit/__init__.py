"""earlyexit: look inside a language model's layers — logit lens, entropy, probes and DoLa.

>>> import earlyexit
>>> model, tok = earlyexit.tiny_model("llama"), earlyexit.load_tokenizer()   # or load_model("smollm2-135m")
>>> r = earlyexit.lens_stats(model, tok, ["The capital of France is"], lens="raw")
>>> r.layers, r.lens
([0, 1, 2, 3, 4], 'raw')
"""
import warnings as _warnings

# tqdm.auto in a notebook kernel without ipywidgets falls back to text bars; its warning (with the machine's
# path to tqdm) would only end up in the executed notebooks
_warnings.filterwarnings("ignore", message="IProgress not found")

# The public names are imported when first used (PEP 562), so ``import earlyexit`` (and the command line's
# start) does not import torch: a Ctrl-C while the CLI starts up ends in one line, not a traceback, and
# ``earlyexit --help`` is quick.
_EXPORTS = {
    "earlyexit.core.arch": ("ARCHITECTURES", "ArchSpec", "resolve_arch"),
    "earlyexit.core.decoding": ("DECODERS", "decode", "decoding_names", "make_scorer"),
    "earlyexit.core.generation": ("LensGeneration", "generate_with_lens"),
    "earlyexit.core.lens": ("LensResult", "answer_span", "depth_layers", "lens_stats"),
    "earlyexit.core.lenses": ("LENS_NAMES", "Lens", "LogitLens", "RawLens", "resolve_lens"),
    "earlyexit.core.models": ("DEFAULT_MODEL", "EMBEDDED_MODELS", "load_model", "load_tokenizer"),
    "earlyexit.core.tiny": ("tiny_model",),
    "earlyexit.core.unembed": ("Unembed",),
    "earlyexit.studies.data": ("load_general_knowledge", "load_true_false", "load_truthfulqa"),
    "earlyexit.view": ("lens_view",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
_WHERE["dola"] = "earlyexit.methods.dola"  # a module
_WHERE["early_exit"] = "earlyexit.methods.early_exit"  # a module: early-exit, self-speculative, layer-skip


def __getattr__(name: str):
    import importlib

    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'earlyexit' has no attribute {name!r}")
    module = importlib.import_module(mod)
    value = module if name in ("dola", "early_exit") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "ArchSpec", "resolve_arch", "Unembed", "load_model", "load_tokenizer", "tiny_model",
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "Lens", "LogitLens", "RawLens", "LENS_NAMES", "resolve_lens",
    "lens_stats", "LensResult", "answer_span", "depth_layers", "generate_with_lens", "LensGeneration",
    "DECODERS", "decode", "decoding_names", "make_scorer",
    "load_truthfulqa", "load_true_false", "load_general_knowledge", "dola", "early_exit", "lens_view",
]
