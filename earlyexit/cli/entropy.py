"""``earlyexit entropy``: the entropy study from the command line (same code as ``Entropy.ipynb``)."""
from __future__ import annotations

import argparse

from earlyexit.cli.common import LENS_CHOICES, lens_notes, number, out_dir, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("entropy", help="per-layer lens entropy of correct vs wrong TruthfulQA answers")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=None, help="first N questions (default: all 817)")
    p.add_argument("--lens", choices=LENS_CHOICES, default=None,
                   help="the lens read at every layer (default normed; tuned: the model's stored tuned lens, "
                        "trained on first use for the embedded models)")
    p.add_argument("--raw", action="store_true", help="raw lens (head without the final norm), as the original "
                                                      "(= --lens raw)")
    p.add_argument("--out", required=True, help="folder for entropy_<model>.json and entropy_per_question_<model>.csv")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threshold", type=number(), default=0.85, help="BERTScore F1 threshold of the original label")
    p.add_argument("--scorer", default="minilm", help="BERTScore model: minilm (embedded) or roberta-large")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=120)
    p.add_argument("--n-boot", type=positive_int, default=2000)
    p.add_argument("--no-cache", action="store_true", help="regenerate instead of reusing cached answers")
    p.set_defaults(func=_run_entropy)


def _run_entropy(args: argparse.Namespace) -> int:
    from earlyexit.core.errors import BadInput
    from earlyexit.reports import display_path
    from earlyexit.reports.entropy import compute, save
    from earlyexit.core.results import EntropyResults
    from earlyexit.studies.entropy import conclusion

    if args.raw and args.lens not in (None, "raw"):
        raise BadInput(f"--raw is --lens raw: give one of --raw and --lens {args.lens}.")
    lens = "raw" if args.raw else args.lens or "normed"
    out_dir(args.out, files=[(EntropyResults.path(args.out, args.model), EntropyResults.KIND),
                             (EntropyResults.csv_path(args.out, args.model), None)])  # before the model loads

    # the same function as Entropy.ipynb: the same results files (cheap inputs checked before the model loads)
    with lens_notes():  # a tuned lens trained on first use is said on stderr before it starts
        study, parameters = compute(args.model, limit=args.limit, data_dir=args.data_dir, lens=lens,
                                    threshold=args.threshold, scorer=args.scorer, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, n_boot=args.n_boot,
                                    cache_dir=False if args.no_cache else None)
    paths = save(study, args.out, parameters)
    from earlyexit.core.parallel import is_main_process

    if is_main_process():  # under accelerate launch the main process wrote the files
        print(conclusion(study))
        print("wrote " + ", ".join(display_path(p) for p in paths))
    return 0
