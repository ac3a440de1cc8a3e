"""One markdown table comparing chatwatch with the harness's peers, from the harness JSON.

    python tests/bench/report.py [--results bench-results] [--name chatwatch]
        [--peers asyncio,node] [--scenarios broadcast,...,broadcast-natsdefaults]
        [--history chatwatch-history] [--out bench-results/summary.md]

The benchmark driver (tests/bench/run.py, or the independent cross-check harness)
writes one file per target and scenario, ``<results>/<name>-<scenario><suffix>.json``:
``{"runs": [<loadgen result>, ...], ...}``.
A run is left out when it has an ``error`` (the loadgen failed); of the rest, the runs
not marked ``disturbed`` are used (all of them if every run was disturbed), as the
harness does. Figures are medians over those runs; missing / duplicate / out-of-order
counts and silent watchers are the maximum over every run without an error, so a
single bad run shows. ``nox -s bench`` runs this after the harness.

``--history NAME`` adds chatwatch with history on (the runs named NAME: broadcast, idle,
resume) against --name's runs (history off), with the on/off ratios issue 8 sets as
targets. No peer resumes, so the resume scenario is shown there only, chatwatch alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Run = Mapping[str, Any]

DEFAULT_SCENARIOS = ("broadcast", "paced", "many", "idle", "churn")
DEFAULT_LIMITS_SUFFIX = "-natsdefaults"
# The pseudo-scenario for the broadcast run against nats-server's default limits.
DEFAULT_LIMITS = "broadcast" + DEFAULT_LIMITS_SUFFIX


@dataclass(frozen=True, slots=True)
class Cell:
    """A figure and how it is shown; `value` is what ratios are taken of (None: none)."""

    value: float | None
    text: str


NOT_RUN = Cell(None, "n/a")
NO_VALUE = Cell(None, "-")


@dataclass(frozen=True, slots=True)
class Result:
    """One target's runs of one scenario, as the harness wrote them."""

    runs: list[Run]  # every run, errors included

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if "error" not in r]

    @property
    def used(self) -> list[Run]:
        """Runs the medians are taken over: the undisturbed ones, else all completed."""
        done = self.completed
        return [r for r in done if not r.get("disturbed")] or done


def lookup(run: Run, path: str) -> float | None:
    """The number at a dotted path of a run (`delivery.latency_ms.p99`), or None."""
    node: Any = run
    for key in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def values(runs: Sequence[Run], path: str) -> list[float]:
    return [v for v in (lookup(r, path) for r in runs) if v is not None]


def median(runs: Sequence[Run], path: str) -> float | None:
    found = values(runs, path)
    return statistics.median(found) if found else None


def maximum(runs: Sequence[Run], path: str) -> float | None:
    found = values(runs, path)
    return max(found) if found else None


def number(value: float | None, digits: int) -> Cell:
    if value is None:
        return NO_VALUE
    return Cell(value, f"{value:,.{digits}f}")


def count(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


# -- metrics: each turns one target's result into a cell -----------------------------

Metric = Callable[[Result], Cell]


def median_of(path: str, digits: int) -> Metric:
    return lambda res: number(median(res.used, path), digits)


def runs_ok(res: Result) -> Cell:
    ok = sum(1 for r in res.completed if r.get("ok") is True)
    text = f"{ok}/{len(res.runs)}"
    errors = len(res.runs) - len(res.completed)
    disturbed = sum(1 for r in res.completed if r.get("disturbed"))
    notes = [f"{errors} failed"] if errors else []
    if disturbed:
        notes.append(f"{disturbed} disturbed")
    return Cell(None, text + (f" ({', '.join(notes)})" if notes else ""))


def subs_gone(res: Result) -> Cell:
    """Median time until the gateway's NATS subscriptions were 0 after all clients closed."""
    left = maximum(res.completed, "cleanup.subs_remaining")
    cell = number(median(res.used, "cleanup.subs_zero_ms"), 0)
    if left:
        return Cell(None, f"{cell.text} ({count(left)} subs left)")
    return cell


def missing_dup_ooo(res: Result) -> Cell:
    runs = res.completed
    if not runs:
        return NO_VALUE
    parts = [maximum(runs, f"delivery.{key}") for key in ("missing", "duplicates", "out_of_order")]
    return Cell(None, " / ".join(count(p) for p in parts))


def silent_watchers(res: Result) -> Cell:
    runs = res.completed
    return Cell(None, count(maximum(runs, "delivery.silent_watchers"))) if runs else NO_VALUE


def delivered_percent(res: Result) -> Cell:
    shares = [
        100.0 * unique / expected
        for r in res.used
        if (unique := lookup(r, "delivery.unique")) is not None
        and (expected := lookup(r, "delivery.expected"))
    ]
    return number(statistics.median(shares), 1) if shares else NO_VALUE


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    metric: Metric
    ratio: bool = True  # whether chatwatch ÷ peer means anything


def rows_for(scenario: str) -> list[Row]:
    """What the table shows per scenario (↑: higher is better, ↓: lower is better)."""
    rows = [Row("runs ok", runs_ok, ratio=False)]
    if scenario == "broadcast":
        rows.append(Row("delivered events/s ↑", median_of("delivery.events_per_s", 0)))
        rows.append(Row("server CPU us per delivered event ↓", server_us_per_event))
    elif scenario == "paced":
        rows.append(Row("latency p50 ms ↓", median_of("delivery.latency_ms.p50", 1)))
        rows.append(Row("latency p99 ms ↓", median_of("delivery.latency_ms.p99", 1)))
    elif scenario == "many":
        rows.append(Row("events/s ↑", median_of("delivery.events_per_s", 0)))
    elif scenario == "idle":
        rows.append(Row("RSS per idle watcher KB ↓", median_of("idle.rss_kb_per_watcher", 1)))
        rows.append(Row("connect 5000 watchers s ↓", median_of("connect.t_all_ok_s", 2)))
    elif scenario == "churn":
        rows.append(Row("silent watchers (max) ↓", silent_watchers, ratio=False))
    elif scenario == "resume":
        rows.append(Row("watchers caught up (min)", caught_up, ratio=False))
        for p in ("p50", "p99", "max"):
            rows.append(Row(f"catch-up {p} ms ↓", median_of(f"resume.catchup_ms.{p}", 0)))
        rows.append(Row("all caught up s ↓", median_of("resume.all_caught_up_s", 2)))
        rows.append(Row("replayed events/s ↑", median_of("resume.replayed_events_per_s", 0)))
        rows.append(Row("error events (max) ↓", error_events, ratio=False))
    elif scenario == DEFAULT_LIMITS:
        rows.append(Row("delivered % ↑", delivered_percent))
        rows.append(Row("NATS slow consumers (max)", slow_consumers, ratio=False))
    if scenario != DEFAULT_LIMITS:
        rows.append(Row("subscriptions gone after close ms ↓", subs_gone))
    rows.append(Row("missing / dup / out-of-order (max)", missing_dup_ooo, ratio=False))
    return rows


def server_us_per_event(res: Result) -> Cell:
    """The server's CPU time over the delivery phase per event delivered: its cost even
    where the load generator, not the server, limited events/s."""
    costs = [
        util * wall * 1e6 / unique
        for r in res.used
        if (util := lookup(r, "phases.delivery.server.util")) is not None
        and (wall := lookup(r, "phases.delivery.wall_s")) is not None
        and (unique := lookup(r, "delivery.unique"))
    ]
    return number(statistics.median(costs), 2) if costs else NO_VALUE


def error_events(res: Result) -> Cell:
    runs = res.completed
    return Cell(None, count(maximum(runs, "delivery.error_events"))) if runs else NO_VALUE


def caught_up(res: Result) -> Cell:
    """Resumed watchers that received every event they were behind, of all of them,
    in the worst run."""
    runs = res.completed
    got = [v for v in (lookup(r, "resume.caught_up") for r in runs) if v is not None]
    of = maximum(runs, "resume.watchers")
    return Cell(None, f"{count(min(got))} / {count(of)}") if got else NO_VALUE


def slow_consumers(res: Result) -> Cell:
    runs = res.completed
    return Cell(None, count(maximum(runs, "nats.slow_consumers"))) if runs else NO_VALUE


# -- loading and rendering -------------------------------------------------------------


def load(results: Path, name: str, scenario: str) -> Result | None:
    path = results / f"{name}-{scenario}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list):
        raise ValueError(f"{path}: no 'runs' list; not a harness result file?")
    return Result([r for r in runs if isinstance(r, dict)])


def ratio(ours: Cell, theirs: Cell) -> str:
    if ours.value is None or theirs.value is None or theirs.value == 0:
        return "-"
    return f"{ours.value / theirs.value:.2f}x"


def table(results: Path, name: str, peers: Sequence[str], scenarios: Sequence[str]) -> list[str]:
    head = ["scenario", "metric", name, *peers, *(f"{name} ÷ {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scenario in scenarios:
        ours = load(results, name, scenario)
        theirs = [load(results, p, scenario) for p in peers]
        for row in rows_for(scenario):
            mine = row.metric(ours) if ours is not None else NOT_RUN
            others = [row.metric(t) if t is not None else NOT_RUN for t in theirs]
            ratios = [ratio(mine, o) if row.ratio else "-" for o in others]
            label = scenario.replace(DEFAULT_LIMITS_SUFFIX, " (nats defaults)")
            cells = [label, row.label, mine.text, *(o.text for o in others), *ratios]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


LEGEND = (
    "Figures: medians over undisturbed runs; counts marked (max): maximum over all"
    " completed runs. `runs ok`: runs the loadgen marked ok / runs. Ratio = {name}'s"
    " figure ÷ the peer's (↑ metrics: > 1 is better for {name}; ↓ metrics: < 1)."
    " n/a: not run."
)


# History on vs off, measured in one invocation (issue 8's targets): the row's metric
# path, the scenario it comes from, the bound on on/off, and which side of it is met.
HISTORY_TARGETS = (
    ("broadcast", "delivery.events_per_s", "delivered events/s", 0.8, "≥"),
    ("idle", "idle.rss_kb_per_watcher", "RSS per idle watcher", 1.1, "≤"),
)
HISTORY_SCENARIOS = ("broadcast", "idle", "resume")


def history_targets(results: Path, on: str, off: str, scenarios: Sequence[str]) -> list[str]:
    """One line per target of `scenarios`: the on/off ratio of the medians and whether
    it is met (results of scenarios not asked for may be left from an earlier run)."""
    lines = []
    for scenario, path, label, bound, side in HISTORY_TARGETS:
        if scenario not in scenarios:
            continue
        ours, base = load(results, on, scenario), load(results, off, scenario)
        if ours is None or base is None:
            continue
        a, b = median(ours.used, path), median(base.used, path)
        if a is None or b is None or b == 0:
            lines.append(f"- {label}, history on ÷ off: no figure (a run failed)")
            continue
        value = a / b
        met = value >= bound if side == "≥" else value <= bound
        verdict = "met" if met else "NOT met"
        lines.append(
            f"- {label}, history on ÷ off: {value:.2f}x (target {side} {bound}x): {verdict}"
        )
    return lines


def history_section(results: Path, on: str, off: str, scenarios: Sequence[str]) -> list[str]:
    """chatwatch with history on (JetStream) against itself with history off; empty
    when the history-on run was not made."""
    shown = [s for s in HISTORY_SCENARIOS if s in scenarios]
    if not any(load(results, on, s) is not None for s in shown):
        return []
    lines = [f"History on ({on}: --history on, nats-server -js) vs off ({off}):", ""]
    lines += table(results, on, [off], shown)
    return [*lines, "", *history_targets(results, on, off, shown), ""]


def build(
    results: Path,
    name: str,
    peers: Sequence[str],
    scenarios: Sequence[str],
    history: str | None = None,
) -> str:
    """The comparison with the peers (resume left out: no peer resumes), then, with
    `history`, the history-on section."""
    compared = [s for s in scenarios if s != "resume"]
    lines = table(results, name, peers, compared) if compared else []
    lines = [*lines, "", LEGEND.format(name=name), ""] if compared else []
    if history is not None:
        lines += history_section(results, history, name, scenarios)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("bench-results"))
    ap.add_argument("--name", default="chatwatch")
    ap.add_argument("--peers", default="asyncio,node", help="comma-separated")
    ap.add_argument(
        "--scenarios",
        default=",".join([*DEFAULT_SCENARIOS, DEFAULT_LIMITS]),
        help=f"comma-separated; {DEFAULT_LIMITS}: the broadcast run with nats-server's"
        " default limits (run.py --nats-default-limits --suffix=" + DEFAULT_LIMITS_SUFFIX + ")",
    )
    ap.add_argument(
        "--history",
        metavar="NAME",
        help="the result name of the history-on runs (broadcast, idle, resume): adds a"
        " table of them against --name's, with issue 8's on/off targets",
    )
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    peers = [p for p in args.peers.split(",") if p]
    text = build(args.results, args.name, peers, scenarios, args.history)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
