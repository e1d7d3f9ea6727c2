"""``earlyexit truthfulqa generate|mc|score``: the TruthfulQA evaluation from the command line.

    earlyexit truthfulqa generate --model smollm2-135m --decoding dola --out answers.json
    earlyexit truthfulqa mc --model smollm2-135m --decoding dola --dola-layers high --limit 20 --out mc.json
    earlyexit truthfulqa score --predictions answers.json --out scores.json

Every output JSON keeps the settings, the model and the library versions, and is written atomically.
"""
from __future__ import annotations

import argparse

from earlyexit.cli.common import (LENS_CHOICES, cli_lens, lens_record, nonnegative_int, number,
                                  out_file, positive_int)
from earlyexit.core.decoding import decoding_names
from earlyexit.core.parallel import is_main_process

from earlyexit.core.results import GenerateResults, MCResults, ScoresResults, write_result
from earlyexit.core.errors import BadInput
from earlyexit.reports import display_path


def _layers(text: str) -> str | list[int]:
    if text in ("high", "low"):
        return text
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
        if any(x < 0 for x in layers):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dola-layers takes high, low or comma-separated entries, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--dola-layers is empty: give high, low or entries such as 16,18,20.")
    return layers


_positive = positive_int


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--decoding", required=True, choices=decoding_names())
    p.add_argument("--dola-layers", type=_layers, default="high", help="high, low, or entries such as 16,18,20")
    p.add_argument("--premature-layer", type=nonnegative_int, default=None, help="the premature entry of dola-static")
    p.add_argument("--premature-lens", choices=LENS_CHOICES, default="raw",
                   help="the lens of DoLa's premature logits (default raw, the published one; tuned: the model's "
                        "stored tuned lens, trained on first use for the embedded models)")
    p.add_argument("--limit", type=_positive, default=None, help="first N questions (default: all 817)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="the model's dtype (default float32); lens statistics and contrasts stay float32")
    p.add_argument("--device-map", choices=("auto", "balanced", "sequential"), default=None,
                   help="spread one model over the GPUs (then CPU, disk) with accelerate; one process only")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("truthfulqa", help="TruthfulQA: open-ended answers, multiple choice, scoring")
    tq = p.add_subparsers(dest="truthfulqa_command", required=True)

    g = tq.add_parser("generate", help="greedy answers (vanilla or DoLa) to the TruthfulQA questions")
    _common(g)
    g.add_argument("--repetition-penalty", type=number(above=0), default=None, help="default 1.0 vanilla, 1.2 DoLa")
    g.add_argument("--relative-top", type=number(above=0, maximum=1), default=0.1)
    g.add_argument("--max-new-tokens", type=_positive, default=50)
    g.add_argument("--batch-size", type=_positive, default=8)
    g.set_defaults(func=_run_generate)

    m = tq.add_parser("mc", help="MC1/MC2/MC3 (the DoLa paper's multiple-choice protocol)")
    _common(m)
    m.set_defaults(func=_run_mc)

    s = tq.add_parser("score", help="BLEU / ROUGE-L / BERTScore of a predictions file")
    s.add_argument("--predictions", required=True,
                   help="a generate output, or the DoLa paper's {'question': [...], 'model_completion': [...]}")
    s.add_argument("--bertscore", choices=("minilm", "roberta-large"), default="minilm")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_run_score)


def _run_generate(args: argparse.Namespace) -> int:
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.methods.dola import resolve_settings
    from earlyexit.core.models import load_model
    from earlyexit.studies.openended import generate_answers, generation_settings

    out_file(args.out, kind=GenerateResults.KIND)  # before the model loads
    settings = generation_settings(args.decoding, dola_layers=args.dola_layers, premature_layer=args.premature_layer,
                                   repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                                   relative_top=args.relative_top, premature_lens=args.premature_lens,
                                   batch_size=args.batch_size)
    items = load_truthfulqa(args.data_dir, args.limit)
    model, tok = load_model(args.model, dtype=args.dtype, device_map=args.device_map)
    if "premature_lens" in settings:  # a decoding that reads premature layers: a missing tuned lens fails here
        settings.update(lens_record(cli_lens(model, settings["premature_lens"]), "premature_lens"))
    resolve_settings(model, decoding=args.decoding, dola_layers=args.dola_layers, premature_layer=args.premature_layer,
                     relative_top=args.relative_top, repetition_penalty=settings["repetition_penalty"],
                     premature_lens=args.premature_lens)  # fail before any generation
    doc = generate_answers(model, tok, items, settings, out=args.out, progress=args.progress)
    if is_main_process():  # in an accelerate launch group the main process wrote the file
        print(f"wrote {args.out}: {len(doc['items'])} answers ({args.decoding})")
    return 0


def _run_mc(args: argparse.Namespace) -> int:
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.core.meta import run_metadata
    from earlyexit.core.models import load_model
    from earlyexit.methods.contrast import candidate_layers
    from earlyexit.core.lenses import get_unembed
    from earlyexit.studies.mc import evaluate, mc_raw_sharded

    if args.decoding == "dola-static" and args.premature_layer is None:
        raise BadInput("--decoding dola-static needs --premature-layer K (a hidden-state entry in 0..L-1).")
    if args.decoding not in ("vanilla", "dola", "dola-static"):
        raise BadInput(f"truthfulqa mc scores vanilla, dola and dola-static, not {args.decoding!r}.")
    out_file(args.out, kind=MCResults.KIND)  # before the model loads
    items = load_truthfulqa(args.data_dir, args.limit)
    model, tok = load_model(args.model, dtype=args.dtype, device_map=args.device_map)
    u = get_unembed(model)
    kw: dict = {}
    if args.decoding == "vanilla":
        layers: list[int] = []
    elif args.decoding == "dola":
        layers = candidate_layers(u.n_layers, u.arch.tied_embeddings, args.dola_layers)
        kw["candidates"] = layers
    else:
        layers = candidate_layers(u.n_layers, u.arch.tied_embeddings, [args.premature_layer])
        kw["premature_layer"] = args.premature_layer
    # vanilla reads no premature layer: a tuned lens is neither needed nor trained for it
    lens = cli_lens(model, args.premature_lens if layers or args.premature_lens != "tuned" else "raw")
    # in an accelerate launch group each process scores its shard of the questions; all get every record
    raws, info = mc_raw_sharded(model, tok, items, layers=layers, lens=lens, progress=args.progress)
    res = evaluate(raws, args.decoding, **kw)
    settings = {"decoding": args.decoding, "candidates": kw.get("candidates"),
                "premature_layer": kw.get("premature_layer"),
                **(lens_record(lens, "premature_lens") if layers else {"premature_lens": args.premature_lens}),
                "plausibility": False, "answer_format": "' ' + answer, '.' appended when missing"}
    # the layout of dola.ipynb's dola_mc_<model>.json: one entry per decoding under "decodings"
    par = info if info.num_processes > 1 else None
    write_result(args.out, MCResults.KIND, {"meta": run_metadata(model, len(items), data=items, parallel=par, **settings),
                                            "decodings": {args.decoding: res.as_dict()}})  # main process only
    if is_main_process():
        print(f"wrote {args.out}: MC1 {res.means['mc1']:.3f}  MC2 {res.means['mc2']:.3f}  MC3 {res.means['mc3']:.3f}"
              f"  (n = {len(items)}, {args.decoding})")
    return 0


def _run_score(args: argparse.Namespace) -> int:
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.core.meta import run_metadata
    from earlyexit.studies.openended import read_predictions, score_completions

    out_file(args.out, kind=ScoresResults.KIND, inputs=[("--predictions", args.predictions)])  # before the work
    items = load_truthfulqa(args.data_dir)
    matched, completions, source_meta = read_predictions(args.predictions, items)
    scores = score_completions(matched, completions, bertscore=args.bertscore)
    name = (source_meta.get("settings") or {}).get("decoding", "predictions")
    # the layout of dola.ipynb's dola_scores_<model>.json: one entry per decoding under "decodings"
    write_result(args.out, ScoresResults.KIND,
                 {"meta": run_metadata(source_meta.get("model"), len(matched), data=items,
                                       predictions=display_path(args.predictions),
                                       bertscore=args.bertscore, source_settings=source_meta.get("settings")),
                  "decodings": {name: scores.as_dict()}})
    s = scores.summary
    print(f"wrote {args.out}: BLEU {s['bleu']['estimate']:.4f}  ROUGE-L {s['rouge_l']['estimate']:.4f}  "
          f"BERTScore {s['bertscore']['estimate']:.4f}  (n = {s['n']})")
    return 0
