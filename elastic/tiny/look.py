"""Where the tiny LLaVA's look-guided heads attend, per question kind.

    python -m elastic.tiny.look --n 40

Prints, per question kind, the geometric-mean attention mass that the guided heads
(layer 2, heads 2 and 3 of ``assets/tiny-llava``) put on the cells the answer depends on
while the reference answer is teacher-forced (``train.look_report``). Only meaningful for
the 4-layer tiny LLaVA, whose training guides those heads.
"""

from __future__ import annotations

import argparse

import torch

from . import SHIPPED_MODEL_DIR, load
from .data import VAL_OFFSET
from .train import look_report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="a tiny LLaVA directory")
    ap.add_argument("--seed", type=int, default=0, help="offset into the validation seeds")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    seeds = range(VAL_OFFSET + args.seed, VAL_OFFSET + args.seed + args.n)
    for kind, mass in look_report(model, processor, seeds).items():
        print(f"look_mass {kind}={mass:.3f}")


if __name__ == "__main__":
    main()
