"""Is group A hurt more than group B? The interval of the difference of their changes.

For each compressed population of a study, the change in the positive
class's false-positive rate of group A minus that of group B (e.g. men minus
women, blond), each compressed model paired with its own baseline, with the
two-level bootstrap interval of :func:`compbias.metrics.change_difference`
(seeds and test examples resampled). Reads the registered versions through
the population contract (tags and ``predictions.parquet``), as the audit does.

    MLFLOW_TRACKING_URI=sqlite:////tmp/studies/mlflow-ftsweep.db \\
      python studies/group_difference.py --registered-model compbias-celeba-ftsweep-e2 \\
      --group Male --a 1 --b 0 --positive-class 1
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from mlflow.tracking import MlflowClient

from compbias import metrics as M
from compbias.platform.audit.fetch import ArtifactFetcher
from compbias.platform.audit.selection import list_versions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registered-model", required=True)
    p.add_argument("--group", required=True, help="group column of predictions.parquet, e.g. Male")
    p.add_argument("--a", type=int, required=True, help="value of the group column for group A")
    p.add_argument("--b", type=int, required=True, help="value of the group column for group B")
    p.add_argument("--positive-class", type=int, required=True)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))
    records = list_versions(client, registered_model=args.registered_model)
    if not records:
        print(f"no compbias versions in {args.registered_model!r}", file=sys.stderr)
        return 2
    fetched = ArtifactFetcher(client, None).fetch_all(records)
    bad = {k: f.error for k, f in fetched.items() if not f.ok}
    if bad:
        print(f"unreadable predictions: {bad}", file=sys.stderr)
        return 2
    frames = {r.key: fetched[r.key].predictions for r in records}
    base = [r for r in records if r.is_baseline]
    first = frames[base[0].key]
    y = first["label"].to_numpy()
    g = first[args.group].to_numpy()
    neg = y != args.positive_class
    cell_a, cell_b = neg & (g == args.a), neg & (g == args.b)
    base_rows = {r.version: i for i, r in enumerate(base)}
    base_preds = np.stack([frames[r.key]["pred"].to_numpy() for r in base])
    pops = sorted({r.population for r in records if not r.is_baseline})
    print(f"{args.registered_model}: {args.group}={args.a} minus {args.group}={args.b}, FPR of class {args.positive_class} "
          f"(negatives: {int(cell_a.sum())} vs {int(cell_b.sum())}); {args.resamples} two-level resamples")
    for pop in pops:
        members = [r for r in records if r.population == pop]
        comp = np.stack([frames[r.key]["pred"].to_numpy() for r in members])
        pairs = [base_rows[r.baseline_version] for r in members]
        d = M.paired_error_changes(y, base_preds, comp, pairs=pairs)
        r = M.change_difference(d, cell_a, cell_b, n_resamples=args.resamples, seed=args.seed)
        verdict = "A more" if r.ci_low > 0 else ("B more" if r.ci_high < 0 else "not established")
        print(f"  {pop[0]}@{pop[1]} (S={r.n_pairs}): A {r.change_a:+.2f} pp, B {r.change_b:+.2f} pp, "
              f"A-B {r.difference:+.2f} pp [{r.ci_low:+.2f}, {r.ci_high:+.2f}] -> {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
