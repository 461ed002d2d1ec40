"""rlmt-plot: PNG curves of a run's metrics.jsonl (one per key, plus summary.png)."""

from __future__ import annotations

import argparse

from rlmt_megatron.cli.common import run_main


def main(argv=None) -> None:
    from rlmt_megatron.monitoring.plot import DEFAULT_PLOT_KEYS, plot_metrics

    p = argparse.ArgumentParser(prog="rlmt-plot", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("source", metavar="RUN_DIR_OR_METRICS_JSONL", help="a run directory or its metrics.jsonl")
    p.add_argument(
        "--keys", default=None,
        help="comma-separated metric keys, shell patterns allowed (timing/*); "
        f"default: those of {', '.join(DEFAULT_PLOT_KEYS)} that are present",
    )
    p.add_argument("--out", default=None, help="output folder (default: plots/ next to metrics.jsonl)")
    args = p.parse_args(argv)
    keys = None
    if args.keys is not None:
        keys = [k.strip() for k in args.keys.split(",") if k.strip()]
        if not keys:
            p.error("--keys is empty")
    for path in plot_metrics(args.source, keys, args.out):
        print(path)


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
