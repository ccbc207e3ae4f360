"""``purified-ops demo``: its arguments (checked while parsing), its runs, its report and JSON line."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from ... import _cli_types as arg
from ..._extras import require_extra
from .arms import (BANK_K, BANK_TOP, GRATING_ARMS, POOL_LABELS, PURIFIED_ARMS, SUBSPACE_K, VARIANTS,
                   demo_arms)
from .data import GRATING_CLASSES, NUISANCE_POOL_MAX, NUISANCES, PIXELS, POOL_SIZE, REGIMES, VALIDATION_SIZE
from .jobs import default_jobs, run_jobs
from .tables import GRATING_GOAL, POOL_MARK, compare, format_table, grating_verdict, plot

__all__ = ["add_arguments", "run", "pool_arms", "report", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nuisance", choices=NUISANCES, default="texture",
                   help="texture: one of 4 background textures (default); grating: a sinusoidal "
                        "grating, 8 orientations x 3 frequencies, per-sample purification's regime")
    p.add_argument("--regime", choices=(*REGIMES, "both"), default="both",
                   help="nuisance independent of the digit, correlated in training only, or both "
                        "(default; the JSON's headline lists are for the first: correlated)")
    size = arg.integer(1, POOL_SIZE)
    p.add_argument("--sizes", type=size, nargs="+", default=[50, 100, 200, 400],
                   help=f"training-set sizes of the learning curve, 1 to {POOL_SIZE} (default: 50 100 200 400)")
    p.add_argument("--default-size", type=size, default=100,
                   help="the size the verdict and the JSON's accuracy lists are for (default 100)")
    p.add_argument("--seeds", type=arg.integer(1), default=5, help="seeds per arm and size (default 5)")
    p.add_argument("--steps", type=arg.integer(1), default=500, help="optimizer steps per run (default 500)")
    p.add_argument("--batch-size", type=arg.integer(1), default=32)
    p.add_argument("--lr", type=arg.real(0, open_lo=True), default=1e-3)
    p.add_argument("--irrelevant-weight", type=arg.real(0), default=1.0)
    p.add_argument("--variant", choices=VARIANTS, default="subspace",
                   help="texture's purified arm: subspace purification of the input against K learned "
                        "directions shared by all samples (default), or one direction per sample in "
                        "feature space")
    p.add_argument("--k", type=arg.integer(1, PIXELS), default=SUBSPACE_K,
                   help=f"directions of the subspace variant and of the grating's shared arm, at most the "
                        f"images' {PIXELS} pixels (default {SUBSPACE_K})")
    p.add_argument("--bank-k", type=arg.integer(1, PIXELS), default=BANK_K,
                   help=f"grating's per-sample arm: directions per grating class (default {BANK_K})")
    p.add_argument("--bank-top", type=arg.integer(1, math.prod(GRATING_CLASSES)), default=BANK_TOP,
                   help=f"grating's per-sample arm: z stacks the subspaces of this many most probable "
                        f"classes (default {BANK_TOP})")
    p.add_argument("--bank-init", choices=("moments", "random"), default="moments",
                   help="grating's per-sample arm: class subspaces start from each class's excess second "
                        "moment (default) or at random, then learn the labels")
    p.add_argument("--soft", action="store_true",
                   help="grating's per-sample arm: z mixes the class subspaces by their predicted "
                        "probabilities at test time too (default: the top-1 class's)")
    p.add_argument("--nuisance-pool", type=arg.integer(0, NUISANCE_POOL_MAX), default=0, metavar="M",
                   help="the purified arms' nuisance branch also learns from M images outside the training, "
                        "validation and test sets that carry only nuisance labels (their nuisance follows "
                        "the regime's rule); the main network sees only the task-labelled images (default 0)")
    p.add_argument("--pool-labels", choices=POOL_LABELS, default="pseudo",
                   help="the pool's digits, which it does not carry: the plain network's predictions "
                        "(pseudo, the default: chosen on validation), or unknown (none)")
    p.add_argument("--schedule", choices=("joint", "two_stage"), default="two_stage",
                   help="purified arm: the irrelevant branch first, then frozen (default), or joint training")
    p.add_argument("--no-balance", action="store_true",
                   help="do not balance the irrelevant loss against the digit (by default each sample's "
                        "irrelevant loss is weighted so that texture and digit are independent in the "
                        "weighted training set; learning.balancing_tables)")
    p.add_argument("--no-detach", action="store_true",
                   help="purified arm: let the task loss reach the irrelevant encoder through z")
    p.add_argument("--rho", type=arg.real(0, 1), default=0.9,
                   help="correlated regime: share of training images whose texture is digit mod 4")
    p.add_argument("--plot", type=_plot_file, default="purified_demo.png",
                   help="PNG of the learning curves (default purified_demo.png; '' for none; its folder must exist)")
    p.add_argument("--table", type=arg.output_file, default=None,
                   help="also write the table to this text file (its folder must exist)")
    p.add_argument("--threads", type=arg.integer(1), default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--jobs", type=arg.integer(1), default=None,
                   help="runs in parallel, each in its own process (default: on the CPU, the available "
                        "CPUs divided by --threads; else 1); the results do not depend on it")
    p.add_argument("--device", type=arg.device("cpu", "cuda", "cuda:N", "auto"), default="cpu",
                   help="cpu (default), cuda (or cuda:N), or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _plot_file(text: str) -> str:
    return text if text == "" else arg.image_file(text)


def run(args) -> dict:
    """The runs of the command line's arguments (checked by add_arguments' types)."""
    threads = args.threads
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    sizes = sorted(set(args.sizes) | {args.default_size})
    workers = args.jobs if args.jobs is not None else default_jobs(args.device, threads)
    arms = demo_arms(args.nuisance)
    jobs = [(r, n, s, a) for r in regimes for n in sizes for s in range(args.seeds) for a in arms]
    options = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   irrelevant_weight=args.irrelevant_weight, rho=args.rho, device=args.device,
                   schedule=args.schedule, detach_irrelevant=not args.no_detach,
                   variant=args.variant, k=args.k, balance_irrelevant=not args.no_balance,
                   nuisance=args.nuisance, bank_k=args.bank_k, hard=not args.soft,
                   bank_init=args.bank_init, bank_top=args.bank_top, nuisance_pool=args.nuisance_pool,
                   pool_labels=args.pool_labels)
    start = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc=f"demo runs ({args.nuisance})", unit="run", file=sys.stderr)

    def advance(job):
        bar.set_postfix(regime=job[0], n=job[1])
        bar.update()

    accs = run_jobs(jobs, options, workers=workers, threads=threads, on_done=None if bar is None else advance)
    if bar is not None:
        bar.close()
        sys.stderr.flush()
    wall = time.perf_counter() - start
    results = {r: {n: {a: [] for a in arms} for n in sizes} for r in regimes}
    for (regime, n, _, arm), acc in zip(jobs, accs):      # job order: seeds in order in each list
        results[regime][n][arm].append(acc)
    return {"regimes": regimes, "sizes": sizes, "results": results, "wall_s": wall, "jobs": workers}


def pool_arms(args) -> tuple:
    """The arms of the command line whose nuisance branch learns from the nuisance pool."""
    if not args.nuisance_pool:
        return ()
    return tuple(a for a in demo_arms(args.nuisance) if a in PURIFIED_ARMS)


def report(args, out: dict) -> str:
    regimes, sizes, results = out["regimes"], out["sizes"], out["results"]
    marked = pool_arms(args)
    pool_note = (f"({', '.join(a + POOL_MARK for a in marked)}: the nuisance branch also learned from "
                 f"{args.nuisance_pool} images with nuisance labels only, digits {args.pool_labels}; the main "
                 "network saw only the task-labelled images)")
    if args.nuisance == "grating":
        text = [format_table(results, sizes, GRATING_ARMS,
                             (("per_sample", "plain"), ("per_sample", "shared")), marked),
                "(oracle_*: reference rows that know each image's true grating; not learned)"]
        if marked:
            text.append(pool_note)
        for regime in regimes:
            v = grating_verdict(results[regime][args.default_size])
            p, s = v["vs_plain"], v["vs_shared"]
            text.append(f"[{regime}] n={args.default_size}: per_sample - plain = {p['diff']:+.4f} (SE {p['se']:.4f}), "
                        f"per_sample - shared = {s['diff']:+.4f} (SE {s['se']:.4f}); the goal (>= "
                        f"{GRATING_GOAL:.2f} and > 2 SE over plain, > 2 SE over shared, {args.seeds} seeds) is "
                        f"{'MET' if v['goal_met'] else 'NOT met'}")
        text.append(f"wall time: {out['wall_s']:.1f} s (--jobs {out['jobs']})")
        return "\n".join(text)
    text = [format_table(results, sizes, marked=marked)] + ([pool_note] if marked else [])
    for regime in regimes:
        row = results[regime][args.default_size]
        c = compare(row["plain"], row["purified"])
        verdict = "BEATS" if c["beats_by_2se"] else "does NOT beat"
        text.append(f"[{regime}] n={args.default_size}: purified - plain = {c['diff']:+.4f} "
                    f"(SE {c['se']:.4f}, paired SE {c['se_paired']:.4f}); PurifiedLearning {verdict} "
                    f"the plain network by more than 2 SE over {args.seeds} seeds")
    text.append(f"wall time: {out['wall_s']:.1f} s (--jobs {out['jobs']})")
    return "\n".join(text)


def _refuse(message: str) -> int:
    print(f"purified-ops demo: error: {message}", file=sys.stderr)
    return 2


def main(args) -> int:
    # all of them up front: a missing plotting package must not end a run of minutes at its end
    require_extra("demo", "sklearn", "tqdm", "matplotlib", purpose="purified-ops demo")
    largest = POOL_SIZE - VALIDATION_SIZE - 1       # leaves the pool at least one image of its own
    if args.nuisance_pool and args.schedule != "two_stage":
        return _refuse("--nuisance-pool trains the nuisance branch first: it needs --schedule two_stage")
    if args.nuisance_pool and max(args.sizes + [args.default_size]) > largest:
        return _refuse(f"--nuisance-pool draws outside the training and {VALIDATION_SIZE} validation images: "
                       f"training-set sizes up to {largest} leave it images")
    out = run(args)
    text = report(args, out)
    print(text, flush=True)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(out["results"], out["sizes"], args.plot, default_size=args.default_size,
             arms=demo_arms(args.nuisance), nuisance=args.nuisance)
        print(f"plot: {args.plot}", flush=True)
    if args.json and args.nuisance == "grating":
        head = out["regimes"][0]
        row = out["results"][head][args.default_size]
        v = grating_verdict(row)
        obj = {
            "nuisance": "grating", "regime": head, "default_size": args.default_size, "seeds": args.seeds,
            "k_shared": args.k, "bank_k": args.bank_k, "bank_top": args.bank_top, "bank_init": args.bank_init,
            "hard": not args.soft, "nuisance_pool": args.nuisance_pool, "pool_labels": args.pool_labels,
            "pool_arms": list(pool_arms(args)),
            "schedule": args.schedule, "balanced": not args.no_balance,
            "baseline_acc": row["plain"], "purified_acc": row["per_sample"],
            **{f"{a}_acc": row[a] for a in GRATING_ARMS if a not in ("plain", "per_sample")},
            **v["vs_plain"], "vs_shared": v["vs_shared"], "goal_met": v["goal_met"],
            "goal_met_by_regime": {r: grating_verdict(out["results"][r][args.default_size])["goal_met"]
                                   for r in out["regimes"]},
            "by_regime": {r: {str(n): out["results"][r][n] for n in out["sizes"]} for r in out["regimes"]},
            "wall_s": out["wall_s"], "jobs": out["jobs"], "plot": args.plot or None,
        }
        print(json.dumps(obj), flush=True)
    elif args.json:
        head = out["regimes"][0]
        row = out["results"][head][args.default_size]
        obj = {
            "regime": head, "default_size": args.default_size, "seeds": args.seeds,
            "variant": args.variant, "k": args.k if args.variant == "subspace" else None,
            "nuisance_pool": args.nuisance_pool, "pool_labels": args.pool_labels,
            "pool_arms": list(pool_arms(args)),
            "schedule": args.schedule, "balanced": not args.no_balance,
            "baseline_acc": row["plain"], "purified_acc": row["purified"],
            "multitask_acc": row["multitask"], **compare(row["plain"], row["purified"]),
            "by_regime": {r: {str(n): out["results"][r][n] for n in out["sizes"]} for r in out["regimes"]},
            "wall_s": out["wall_s"], "jobs": out["jobs"], "plot": args.plot or None,
        }
        print(json.dumps(obj), flush=True)
    return 0
