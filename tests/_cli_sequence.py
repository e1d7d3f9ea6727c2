"""Run several commands one after the other in ONE ``accelerate launch`` group (each command's arguments
separated by ``:::``), so that a test pays for starting the processes once. An ``earlyexit`` command runs
exactly as ``accelerate launch -m earlyexit <command>`` runs it; ``studies MODEL OUT CACHE`` runs the entropy
study's answers and the probe features through their Python functions (sharded by chunk) and has the main
process save them to OUT (``torch.save``). Used by tests/test_parallel.py."""
import sys


def studies(model_dir: str, out: str, cache: str):
    """The entropy study's answers (4 questions, chunks of 2) and probe features (8 statements, chunks of 4)."""
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
    if parallel.is_main_process():
        torch.save({"answers": answers, "features": feats}, out)
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
