"""earlyexit: look inside a language model's layers — logit lens, entropy, probes and DoLa.

>>> import earlyexit                                                     # doctest: +SKIP
>>> model, tok = earlyexit.load_model("smollm2-135m")                    # doctest: +SKIP
>>> r = earlyexit.lens_stats(model, tok, ["The capital of France is"])   # doctest: +SKIP
"""
from earlyexit import dola
from earlyexit.arch import ARCHITECTURES, ArchSpec, resolve_arch
from earlyexit.data import load_general_knowledge, load_true_false, load_truthfulqa
from earlyexit.generation import LensGeneration, generate_with_lens
from earlyexit.lens import LensResult, answer_span, depth_layers, lens_stats
from earlyexit.models import DEFAULT_MODEL, EMBEDDED_MODELS, load_model
from earlyexit.unembed import Unembed

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "ArchSpec", "resolve_arch", "Unembed", "load_model", "DEFAULT_MODEL", "EMBEDDED_MODELS",
    "lens_stats", "LensResult", "answer_span", "depth_layers", "generate_with_lens", "LensGeneration",
    "load_truthfulqa", "load_true_false", "load_general_knowledge", "dola",
]
