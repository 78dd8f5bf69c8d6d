"""Plot loss curves of one or more runs to a PNG: python scripts/plot_losses.py runs/tiny [runs/other ...] -o loss.png

Reads each run's metrics.jsonl: training loss (and its parts: ce, mtp, aux) per step, validation loss where present.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read(run_dir: str) -> tuple[dict[str, list], dict[str, list]]:
    train, val = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            target = val if "val_loss" in record else train
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    target.setdefault(key, []).append((record["step"], value))
    return train, val


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("-o", "--out", default="loss.png")
    parser.add_argument("--parts", action="store_true", help="also plot the ce, mtp and aux parts of the loss")
    args = parser.parse_args(argv)

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in args.runs:
        name = os.path.basename(os.path.normpath(run))
        train, val = read(run)
        for key in ["loss"] + (["ce", "mtp", "aux"] if args.parts else []):
            if key in train:
                steps, values = zip(*train[key])
                ax.plot(steps, values, lw=1, label=f"{name} {key}")
        if "val_loss" in val:
            steps, values = zip(*val["val_loss"])
            ax.plot(steps, values, "o-", lw=1.5, label=f"{name} val_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
