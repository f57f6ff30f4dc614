"""Plot a run's training loss and AdaHessian's ``hessian_mean`` against steps, from its trainer_state.json.

    python -m hf_adahessian.examples.plot runs/demo/trainer_state.json        # writes runs/demo/hessian.png

Any Trainer output folder or checkpoint has a ``trainer_state.json`` whose
``log_history`` holds what was logged every ``--logging_steps``.
"""

from __future__ import annotations

import argparse
import json
import os


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in log_history if key in e and "train_runtime" not in e]
    return [s for s, _ in points], [v for _, v in points]


def plot(state_path: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(state_path, encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    steps, loss = series(history, "loss")
    h_steps, hessian = series(history, "hessian_mean")
    if not steps:
        raise SystemExit(f"error: {state_path} has no logged training loss (was --logging_steps larger than the run?)")
    fig, ax_loss = plt.subplots(figsize=(7, 4))
    ax_loss.plot(steps, loss, color="tab:blue", label="training loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss", color="tab:blue")
    if h_steps:
        ax_h = ax_loss.twinx()
        ax_h.plot(h_steps, hessian, color="tab:red", label="hessian_mean")
        ax_h.set_ylabel("hessian_mean (mean |D|, the Hessian-diagonal estimate)", color="tab:red")
        ax_h.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(os.path.dirname(os.path.abspath(state_path)))
    fig.tight_layout()
    out = out or os.path.join(os.path.dirname(state_path) or ".", "hessian.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_adahessian.examples.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("trainer_state", help="a trainer_state.json (or a folder holding one)")
    parser.add_argument("--out", help="the PNG to write (default: hessian.png beside the state)")
    args = parser.parse_args(argv)
    path = args.trainer_state
    if os.path.isdir(path):
        path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found")
    print(f"wrote {plot(path, args.out)}")


if __name__ == "__main__":
    main()
