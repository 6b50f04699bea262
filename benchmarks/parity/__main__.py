"""Side-by-side parity of dfkd-bench's methods with the authors' code (see README.md here).

    python -m benchmarks.parity run --method csd --reference /path/to/CSD --seeds 0,1,2 --output results/parity
    python -m benchmarks.parity table results/parity
    python -m benchmarks.parity show --method csd
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dfkd_bench.config import parse_assignments
from dfkd_bench.errors import DfkdError

from .protocols import PROTOCOLS, REFERENCES, REPOS, ours_command, protocol, protocol_sha
from .sweep import default_teacher_store, existing_result, pick_checkouts, plan, run_one
from .table import write_tables


class _Group(click.Group):
    """A user's mistake: one line on stderr and exit code 2; results already written are kept."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DfkdError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; finished runs are kept, re-run the command to continue", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run dfkd-bench and the authors' code under one protocol and compare them."""


def _methods(value: str) -> list[str]:
    names = list(PROTOCOLS) if value == "all" else [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in PROTOCOLS]
    if unknown or not names:
        raise DfkdError(f"unknown method '{','.join(unknown) or value}'; choose from all, {', '.join(PROTOCOLS)}")
    return names


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise DfkdError(f"--seeds takes integers separated by commas, got '{value}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise DfkdError(f"--seeds needs distinct seeds, got '{value}'")
    return seeds


@cli.command()
@click.option("--method", "method_arg", required=True, help="A method, a comma-separated list, or 'all'.")
@click.option("--reference", "references", multiple=True, type=click.Path(path_type=Path),
              help="A checkout of the authors' code (repeatable: CSD, Fast-Datafree, CMI).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("results/parity"), show_default=True)
@click.option("--sides", type=click.Choice(["both", "theirs", "ours"]), default="both", show_default=True)
@click.option("--rounds", type=int, default=None, help="Override the protocol's rounds (smoke runs; use another "
              "--output, results of two protocols never mix).")
@click.option("--horizon", type=click.Choice(["short", "long"]), default="short", show_default=True,
              help="long: the rounds each method's persistent state needs (protocols.LONG_ROUNDS); use "
                   "another --output, e.g. results/parity/long.")
@click.option("--ours-set", "ours_sets", multiple=True, metavar="KEY=VALUE",
              help="Extra --set for our side, a variant named by --label (e.g. method.aux_T=1).")
@click.option("--label", default="", help="Name of the --ours-set variant (its rows read ours-<label>).")
@click.option("--threads", type=int, default=1, show_default=True, help="OMP_NUM_THREADS of every run.")
@click.option("--teacher-store", type=click.Path(path_type=Path), default=None,
              help="Teacher store for both sides (default: $DFKD_BENCH_TEACHERS or this checkout's teachers/).")
@click.option("--every", type=int, default=5, show_default=True, help="Table checkpoints every N rounds.")
def run(method_arg, references, seeds, output, sides, rounds, horizon, ours_sets, label, threads, teacher_store,
        every):
    """Run both sides (or one) for every seed; finished runs are skipped; then write the tables."""
    methods = _methods(method_arg)
    side_list = ["theirs", "ours"] if sides == "both" else [sides]
    if threads < 1:
        raise DfkdError(f"--threads must be positive, got {threads}")
    checkouts = pick_checkouts(list(references)) if "theirs" in side_list else {}
    protocols = {m: protocol(m, rounds, horizon) for m in methods}
    specs = plan(methods, protocols, _seeds(seeds), side_list, checkouts, label, parse_assignments(ours_sets))
    todo = [s for s in specs if existing_result(s, output) is None]
    store = Path(teacher_store).resolve() if teacher_store else default_teacher_store()
    click.echo(f"{len(specs)} runs, {len(specs) - len(todo)} already finished, {len(todo)} to do; "
               f"output {output}, {threads} thread(s) per run")
    failed = []
    for i, spec in enumerate(todo, 1):
        click.echo(f"== {i}/{len(todo)}: {spec.method} {spec.name}")
        if run_one(spec, output, threads, store, click.echo) is None:
            failed.append(spec)
            click.echo(f"!! {spec.method} {spec.name} failed; see {Path(output) / spec.method / 'logs'}", err=True)
    if any(existing_result(s, output) for s in specs):
        click.echo(write_tables(output, every))
    if failed:
        click.echo(f"{len(failed)} run(s) failed: {', '.join(f'{s.method} {s.name}' for s in failed)}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path), default=Path("results/parity"))
@click.option("--every", type=int, default=5, show_default=True, help="Checkpoints every N rounds.")
def table(output, every):
    """Write <method>/table.md and parity.md from the finished runs under OUTPUT, and print them."""
    click.echo(write_tables(output, every))


@cli.command()
@click.option("--method", "method_arg", default="all", show_default=True)
@click.option("--rounds", type=int, default=None)
@click.option("--horizon", type=click.Choice(["short", "long"]), default="short", show_default=True)
def show(method_arg, rounds, horizon):
    """Print each protocol, the checkouts it runs from, and our side's dfkd-bench command."""
    for method in _methods(method_arg):
        proto = protocol(method, rounds, horizon)
        click.echo(f"## {method} (protocol {protocol_sha(proto)})")
        click.echo("  " + ", ".join(f"{k}={v}" for k, v in proto.items()))
        click.echo("  reference: " + " or ".join(REPOS[r] for r in REFERENCES[method]))
        args = ours_command(method, proto, 0, "OUTPUT", "ours-s0", "TEACHERS")
        click.echo("  ours: dfkd-bench " + " ".join(args))


if __name__ == "__main__":
    cli(prog_name="python -m benchmarks.parity")
