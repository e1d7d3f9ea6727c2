"""``earlyexit tuned-lens``: train a tuned lens for a model, and evaluate it against the logit lens.

    earlyexit tuned-lens train --model smollm2-135m --tokens 131072 --out lenses/smollm2-135m
    earlyexit tuned-lens eval --model smollm2-135m [--lens-dir DIR] [--limit 8] [--json OUT]

Both run data parallel under ``accelerate launch --num_processes N -m earlyexit tuned-lens ...``: training
splits every step's windows over the processes and all-reduces the gradients, evaluation shards the
held-out windows (see :func:`earlyexit.core.tuned_lens.train_tuned_lens`); the main process alone writes
the lens and the JSON, and prints.
"""
from __future__ import annotations

import argparse
import json


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tuned-lens", help="train or evaluate a tuned lens (one affine translator per layer)")
    cmds = p.add_subparsers(dest="tuned_command", required=True)

    t = cmds.add_parser("train", help="train a tuned lens on the held-in split of the prose corpus")
    t.add_argument("--model", default="smollm2-135m", help="embedded short name, Hugging Face id or local folder")
    t.add_argument("--tokens", type=_positive, default=None, help="training tokens of KL steps (default: the "
                   "model's recipe, see earlyexit.core.tuned_lens.default_settings)")
    t.add_argument("--out", required=True, help="folder to write the lens to (config.json, params.pt, earlyexit.json)")
    t.add_argument("--seq-len", type=_positive, default=None)
    t.add_argument("--tokens-per-step", type=_positive, default=None)
    t.add_argument("--init", choices=("zero", "lstsq"), default=None,
                   help="start from the logit lens (zero) or a least-squares fit (lstsq)")
    t.add_argument("--init-tokens", type=_positive, default=None, help="tokens for the least-squares start")
    t.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    t.add_argument("--lr-scale", type=float, default=None)
    t.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="head product type in training")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    t.add_argument("--eval-windows", type=int, default=8,
                   help="held-out windows to report the per-layer KL on after training (0: skip)")
    t.add_argument("--no-store", action="store_true",
                   help="do not also make it the model's cached tuned lens (what --lens tuned uses)")
    t.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out and start over")
    t.set_defaults(func=_train)

    e = cmds.add_parser("eval", help="per-layer KL, cross-entropy, top-1 agreement and entropy on held-out text, "
                                     "logit lens vs tuned lens")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--lens-dir", default=None, help="a saved tuned lens (default: the model's cached one)")
    e.add_argument("--limit", type=int, default=8, help="held-out windows of --seq-len tokens (default 8)")
    e.add_argument("--seq-len", type=_positive, default=512)
    e.add_argument("--json", default=None, help="write the evaluation to this file")
    e.add_argument("--threads", type=_positive, default=None)
    e.set_defaults(func=_eval)


def _settings(args: argparse.Namespace):
    from earlyexit.core.tuned_lens import TrainSettings, default_settings

    fields = {"tokens": args.tokens, "seq_len": args.seq_len, "tokens_per_step": args.tokens_per_step,
              "init": args.init, "init_tokens": args.init_tokens, "optimizer": args.optimizer,
              "lr_scale": args.lr_scale, "dtype": args.dtype, "seed": args.seed}
    base = default_settings(args.model)  # the model's recipe (RECIPES), then the flags
    kw = {k: v for k, v in fields.items() if v is not None}
    if args.tokens is not None and args.tokens <= 0:
        raise ValueError(f"--tokens must be a positive number of training tokens, got {args.tokens}")
    s = TrainSettings(**{**base.__dict__, **kw})
    if "tokens_per_step" not in kw and s.tokens_per_step % s.seq_len:
        s.tokens_per_step = max(s.seq_len, s.tokens_per_step // s.seq_len * s.seq_len)
    return s.validate()


def _table(evals: dict) -> str:
    names = list(evals)
    first = evals[names[0]]
    head = "entry " + " ".join(f"{'KL ' + n:>11s} {'CE ' + n:>11s} {'top1 ' + n:>11s}" for n in names)
    lines = [head]
    for j, e in enumerate(first.layers):
        cells = []
        for n in names:
            ev = evals[n]
            cells.append(f"{ev.mean('kl')[j]:11.3f} {ev.mean('ce')[j]:11.3f} {ev.mean('top1')[j]:11.3f}")
        lines.append(f"{e:5d} " + " ".join(cells))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from earlyexit.core import parallel
    from earlyexit.core.lenses import resolve_lens
    from earlyexit.core.models import load_model
    from earlyexit.core.tuned_lens import (evaluate_lenses, heldout_windows, set_tuned_lens, store_dir,
                                           train_tuned_lens)

    s = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    main = parallel.is_main_process()  # under accelerate launch: the one that writes and prints
    if args.no_resume and checkpoint.exists() and main:
        checkpoint.unlink()
    parallel.barrier()  # nobody reads the checkpoint before it is gone
    lens = train_tuned_lens(model, tok, s, checkpoint=checkpoint, progress=True)
    if args.eval_windows > 0:
        windows = heldout_windows(tok, seq_len=min(s.seq_len, 512), limit=args.eval_windows)
        evals = evaluate_lenses(model, {"logit": resolve_lens(model, "normed"), "tuned": lens}, windows)
        lens.meta["heldout"] = {n: ev.to_dict() for n, ev in evals.items()}
        if main:
            print(_table(evals))
    lens.save(out)  # writes on the main process only
    if main:
        print(f"tuned lens: wrote {out}")
    if not args.no_store:
        lens.save(store_dir(model))
        set_tuned_lens(model, lens)
        if main:
            print(f"tuned lens: it is now {args.model}'s cached tuned lens ({store_dir(model)})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from earlyexit.core import parallel
    from earlyexit.core.atomic import write_json
    from earlyexit.core.lenses import resolve_lens
    from earlyexit.core.meta import run_metadata
    from earlyexit.core.models import load_model
    from earlyexit.core.tuned_lens import TunedLens, evaluate_lenses, heldout_windows, tuned_lens_for

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1 held-out window, got {args.limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    lens = TunedLens.load(args.lens_dir, model) if args.lens_dir else tuned_lens_for(model, tok, train=False)
    windows = heldout_windows(tok, seq_len=args.seq_len, limit=args.limit)
    evals = evaluate_lenses(model, {"logit": resolve_lens(model, "normed"), "tuned": lens}, windows, progress=True)
    if not parallel.is_main_process():  # the windows were sharded and gathered: the main process reports
        return 0
    print(_table(evals))
    if args.json:
        doc = {"meta": run_metadata(model, n=int(windows.shape[0]), seq_len=args.seq_len,
                                    lens=lens.meta.get("trained")),
               "lenses": {n: ev.to_dict() for n, ev in evals.items()}}
        write_json(args.json, doc)
        print(f"tuned lens: wrote {args.json}")
    return 0


def main_json(evals: dict) -> str:  # pragma: no cover - convenience for scripts
    return json.dumps({n: ev.to_dict() for n, ev in evals.items()})
