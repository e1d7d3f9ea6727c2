"""Run several commands one after the other in ONE ``accelerate launch`` group (each command's arguments
separated by ``:::``), so that a test pays for starting the processes once. An ``earlyexit`` command runs
exactly as ``accelerate launch -m earlyexit <command>`` runs it; ``studies MODEL OUT CACHE`` runs the entropy
study's answers, the probe features, the early-exit analysis's tokens, a few steps of tuned-lens training
and its evaluation through their Python functions (each sharded over the processes) and has the main process
save them to OUT (``torch.save``; the lens also to CACHE/lens). Used by tests/test_parallel.py, which runs
the same calls in one process with the settings below."""
import sys

# the tuned lens: 3 steps of 3 windows of 16 tokens (2 + 1 per process: unequal shards), batches of 2, a
# least-squares start on 5 windows (whole batches: 4 + 1), float32 head products, a checkpoint every step
LENS_SETTINGS = dict(tokens=144, seq_len=16, tokens_per_step=48, batch=2, init="lstsq", init_tokens=80,
                     dtype="float32", checkpoint_every=1)
LENS_TEXTS = ["The river runs past the old mill and the children watch the water turn the wheel. "
              "In the morning the baker opens the shop and the smell of bread fills the street. "
              "A letter arrived from the north, written in a careful hand and sealed with wax. "
              "They walked along the coast for three days before they saw the lighthouse."] * 3
EVAL_TEXTS = ["The committee met again on Tuesday and agreed to publish the report in spring. "
              "Her garden was small, but every corner of it held something worth looking at. "
              "When the storm had passed, the village counted its losses and began to rebuild."] * 2
EVAL_WINDOWS = 5  # in batches of 2: 4 + 1 per process
EXIT_QUESTIONS = 5  # chunks of 2: 4 + 1 questions per process


def exit_tokens(model, tok, cache_dir):
    """The early-exit analysis's tokens of the first EXIT_QUESTIONS questions (batches and chunks of 2)."""
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.exit_analysis import collect_tokens

    return collect_tokens(model, tok, load_truthfulqa(limit=EXIT_QUESTIONS), max_new_tokens=6, batch_size=2,
                          chunk_size=2, cache_dir=cache_dir)


def eval_windows(tok):
    from earlyexit.core.tuned_lens import text_windows

    return text_windows(tok, seq_len=LENS_SETTINGS["seq_len"], texts=EVAL_TEXTS)[:EVAL_WINDOWS]


def lens_evals(model, tok, lens):
    from earlyexit.core.lenses import resolve_lens
    from earlyexit.core.tuned_lens import evaluate_lenses

    return evaluate_lenses(model, {"logit": resolve_lens(model, "normed"), "tuned": lens}, eval_windows(tok), batch=2)


def train_lens(model, tok, checkpoint=None):
    from earlyexit.core.tuned_lens import TrainSettings, train_tuned_lens

    log = []
    lens = train_tuned_lens(model, tok, TrainSettings(**LENS_SETTINGS), texts=LENS_TEXTS, checkpoint=checkpoint,
                            progress=False, log=log)
    return lens, log


def gradient_average():
    """``parallel.average_gradients`` on hand-made gradients, per process: a weighted one (process 0: weight
    2, gradient [1, 2, 3]; the others: weight 0, no gradient), a plain mean (gradient = the process index)
    and a parameter without a gradient anywhere. Returns every process's results, gathered."""
    import torch

    from earlyexit.core import parallel

    k = parallel.process_index()
    p, q, r = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 1, 2))
    p.grad = torch.tensor([1.0, 2.0, 3.0]) if k == 0 else None
    parallel.average_gradients([p, r], weight=2 if k == 0 else 0)
    q.grad = torch.tensor([float(k)])
    parallel.average_gradients([q])
    return parallel.gather((p.grad.tolist(), q.grad.tolist(), r.grad is None))


def studies(model_dir: str, out: str, cache: str):
    """The entropy study's answers (4 questions, chunks of 2), probe features (8 statements, chunks of 4), the
    exit analysis's tokens and the tuned lens (trained, saved to CACHE/lens, evaluated)."""
    from pathlib import Path

    import torch

    from earlyexit.core import parallel
    from earlyexit.core.models import load_model
    from earlyexit.studies.data import load_true_false, load_truthfulqa
    from earlyexit.studies.entropy import generate_answers
    from earlyexit.studies.features import extract_features

    model, tok = load_model(model_dir)
    answers = generate_answers(model, tok, load_truthfulqa(limit=4), batch_size=2, chunk_size=2, max_new_tokens=8,
                               cache_dir=f"{cache}/entropy", progress=False)
    feats = extract_features(model, tok, load_true_false("cities", None, 8), "prompted", batch_size=2, chunk_size=4,
                             cache_dir=f"{cache}/features")
    tokens = exit_tokens(model, tok, f"{cache}/exit")
    checkpoint = Path(cache) / "lens-checkpoint.pt"
    lens, log = train_lens(model, tok, checkpoint)
    lens.save(Path(cache) / "lens")  # the main process alone writes
    evals = lens_evals(model, tok, lens)
    grads = gradient_average()
    if parallel.is_main_process():
        torch.save({"answers": answers, "features": feats, "exit": tokens, "lens_log": log, "evals": evals,
                    "checkpoint_left": checkpoint.exists(), "grads": grads}, out)
    return 0


if __name__ == "__main__":
    from earlyexit.cli import main

    commands, current = [], []
    for arg in sys.argv[1:]:
        if arg == ":::":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for args in commands:
        code = studies(*args[1:]) if args[0] == "studies" else main(args)
        if code:
            sys.exit(code)
