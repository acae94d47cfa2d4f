"""The benchmark results: one append-only file, and the README tables generated from it.

    python bench/results.py            # regenerate bench/results/README.md from results.jsonl

Each row is one variant of one benchmark run: its numbers, the card, the software versions, the
commit and the date. Runs are never edited; a new measurement is a new row. The narrative of why each
change was made, and what it gave, is in bench/results/LOG.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "results.jsonl"
README = HERE / "results" / "README.md"
# the baseline each training-speed run reports its ratios against, measured in the same run
BASELINE = "guide_qlora_as_written"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_rows(bench: str, run: str, variants: Iterable[dict[str, Any]], env: dict[str, Any],
              date: str | None = None, commit_id: str | None = None, **common: Any) -> list[dict[str, Any]]:
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    commit_id = commit_id or commit()
    return [{"bench": bench, "run": run, "date": date, "commit": commit_id, "card": env.get("gpu", "cpu"),
             "env": env, **common, **v} for v in variants]


def append(rows: Iterable[dict[str, Any]], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def load(path: Path = RESULTS) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else ("" if x is None else str(x))


def _versions(env: dict[str, Any]) -> str:
    keys = ("torch", "transformers", "peft", "pytorch-lightning", "bitsandbytes", "liger-kernel", "triton")
    return ", ".join(f"{k} {env[k]}" for k in keys if env.get(k) and env[k] != "not installed")


def _epochs(r: dict[str, Any]) -> str:
    """A whole run's first epoch and the median of its later ones (bench/train_command.py rows), in samples/s."""
    eps = [x for x in r.get("epoch_samples_per_s") or [] if x]
    if not eps:
        return ""
    later = sorted(eps[1:])
    return f"{eps[0]:.2f} / {later[len(later) // 2]:.2f}" if later else f"{eps[0]:.2f}"


def training_table(rows: list[dict[str, Any]]) -> str:
    # a run of several device calls (field ``call``) is read against the guide of each row's own call where that
    # call measured one, since a call can land on a fresh machine; otherwise against the run's first
    bases = [r for r in rows if r.get("name") == BASELINE and "samples_per_s" in r]
    by_call = {r.get("call"): r for r in reversed(bases)}
    runs = any(r.get("epoch_samples_per_s") for r in rows)  # whole runs of the real command: their epochs too
    extra = (" first / later epochs |", "---|") if runs else ("", "")
    lines = ["| variant | step | batch | samples/s | peak GiB | x guide as written |" + extra[0],
             "|---|---|---|---|---|---|" + extra[1]]
    for r in rows:
        if "samples_per_s" not in r:
            lines.append(f"| {r.get('desc', r.get('name'))} | | | error: {str(r.get('error', ''))[:60]} | | |"
                         + (" |" if runs else ""))
            continue
        base = by_call.get(r.get("call"), bases[0] if bases else None)
        ratio = r["samples_per_s"] / base["samples_per_s"] if base else None
        lines.append(f"| {r.get('desc', r.get('name'))} | {r.get('step', '')} | {r.get('batch', '')} | "
                     f"{_fmt(r['samples_per_s'])} | {_fmt(r.get('peak_gib'), 1)} | {_fmt(ratio)} |"
                     + (f" {_epochs(r)} |" if runs else ""))
    return "\n".join(lines)


def generic_table(rows: list[dict[str, Any]]) -> str:
    skip = {"bench", "run", "date", "commit", "card", "env"}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]
    keys = [k for k in keys if all(not isinstance(r.get(k), (dict, list)) for r in rows)][:8]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k), 3) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def render(rows: list[dict[str, Any]]) -> str:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["bench"], r["run"]), []).append(r)
    begins = {key: i for i, key in enumerate(runs)}  # runs in the order they begin in the file
    order = sorted(runs, key=lambda k: (runs[k][0]["date"], begins[k]), reverse=True)  # newest first
    out = ["# Benchmark results", "",
           "Generated by `python bench/results.py` from `results.jsonl` (one row per variant per run, append-only); "
           "do not edit by hand. Why each change was made and what it gave: `LOG.md`. Every ratio compares rows of "
           "one run (one process or one machine, the baseline measured in the same run; where a run's rows name "
           "their device call, against the guide of the row's own call). Newest runs first.", ""]
    for key in order:
        group = runs[key]
        first = group[0]
        out += [f"## {first['bench']} · {first['run']} · {first['date']}", "",
                f"Card: {first['card']}. Commit: {first['commit']}. {_versions(first.get('env', {}))}", ""]
        out += [training_table(group) if first["bench"] == "train_speed" else generic_table(group), ""]
    return "\n".join(out)


def add_file(path: Path, run: str) -> int:
    """Append a benchmark's JSON output (``{"env", "variants"[, "numerics"]}`` or ``{"env", "runs"}``) as rows."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    env = d.get("env", {})
    bench = d.get("bench") or ("train_speed" if "variants" in d else "ddp_speed")
    rows = make_rows(bench, run, d.get("variants") or d.get("runs") or [], env, **d.get("common", {}))
    if d.get("numerics"):
        rows += make_rows("train_numerics", run, [d["numerics"]], env)
    append(rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Append a benchmark's output to results.jsonl; regenerate README.md.")
    ap.add_argument("--add", type=Path, help="a benchmark's JSON output to append as rows")
    ap.add_argument("--run", help="the run's name (default: the file's stem)")
    args = ap.parse_args(argv)
    if args.add:
        print(f"appended {add_file(args.add, args.run or args.add.stem)} rows")
    README.write_text(render(load()), encoding="utf-8")
    print(f"wrote {README} ({len(load())} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
