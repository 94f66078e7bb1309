"""How much of crossrec's top 10 on a dataset's test targets is items the user already had
before the 50-event window the ranker sees (its `seen` feature covers the window only), and
the HR@10 were every item of the user's input masked out (an upper bound on that lever).

    .venv/bin/python -m bench.seen_beyond_window --model-repo models-movielens-1m \\
        --dataset movielens-1m [--users 1500]    (prints; figures quoted in export-decisions)
"""

from __future__ import annotations

import sys

from bench.common import machine
from export import cli
from export.cases import build_cases, default_data, held_out_users
from export.metrics import K as TOP_K
from export.systems import rank_fn

WINDOW = 50


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1500)
    args = parser.parse_args(argv)
    cli.limit_blas_threads()
    data = default_data(args.model_repo, args.dataset)
    cases = build_cases("A", "warm", held_out_users(data, "test")[:args.users], data, "test")
    crossrec = rank_fn("crossrec", args.model_repo, data)
    in_window = older = hits = masked_hits = 0
    for c in cases:
        _, ranked = crossrec.ranked(c.query)
        rows = data.catalogue[c.platform][ranked.rows].tolist()
        history = c.query.rows.tolist()
        window, everything = set(history[-WINDOW:]), set(history)
        in_window += sum(r in window for r in rows[:TOP_K])
        older += sum(r in everything and r not in window for r in rows[:TOP_K])
        hits += c.query.target_row in rows[:TOP_K]
        masked_hits += c.query.target_row in [r for r in rows if r not in everything][:TOP_K]
    print(machine())
    print(f"{len(cases)} test cases, {TOP_K * len(cases)} top-{TOP_K} slots: {in_window} seen "
          f"in the window, {older} seen before it ({older / (TOP_K * len(cases)):.1%}); "
          f"HR@{TOP_K} {hits / len(cases):.4f}, every seen item masked "
          f"{masked_hits / len(cases):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
