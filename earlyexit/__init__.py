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

from earlyexit.core.arch import ARCHITECTURES, ArchSpec, resolve_arch
from earlyexit.core.decoding import DECODERS, decode, decoding_names, make_scorer
from earlyexit.core.generation import LensGeneration, generate_with_lens
from earlyexit.core.lens import LensResult, answer_span, depth_layers, lens_stats
from earlyexit.core.lenses import LENS_NAMES, Lens, LogitLens, RawLens, resolve_lens
from earlyexit.core.models import DEFAULT_MODEL, EMBEDDED_MODELS, load_model, load_tokenizer
from earlyexit.core.tiny import tiny_model
from earlyexit.core.unembed import Unembed
from earlyexit.methods import dola
from earlyexit.studies.data import load_general_knowledge, load_true_false, load_truthfulqa

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "ArchSpec", "resolve_arch", "Unembed", "load_model", "load_tokenizer", "tiny_model",
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "Lens", "LogitLens", "RawLens", "LENS_NAMES", "resolve_lens",
    "lens_stats", "LensResult", "answer_span", "depth_layers", "generate_with_lens", "LensGeneration",
    "DECODERS", "decode", "decoding_names", "make_scorer",
    "load_truthfulqa", "load_true_false", "load_general_knowledge", "dola",
]
