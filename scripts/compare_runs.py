"""Compare two training runs of the same batches (e.g. adaptive vs static SP): measured tokens/s
and the loss curves. One line on stdout; used by scripts/demo.sh.

    python scripts/compare_runs.py outputs/demo/adaptive outputs/demo/static

tokens/s = tokens of steps 2.. / their summed step time (step 1 also starts the planner and warms
up, in both runs); losses must agree (same data, init and optimizer: only the plans differ).
"""
import json
import sys
from pathlib import Path


def load(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"compare_runs: error: {path} does not exist (did the run finish?)")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def rate(rows: list[dict]) -> float:
    rows = rows[1:] or rows
    return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit("usage: compare_runs.py RUN_A RUN_B")
    a_dir, b_dir = map(Path, argv)
    a, b = load(a_dir), load(b_dir)
    if [r["doc_ids"] for r in a] != [r["doc_ids"] for r in b]:
        sys.exit("compare_runs: error: the two runs did not train the same batches")
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    ra, rb = rate(a), rate(b)
    print(f"[flexsp] same {len(a)} batches, same losses (max |diff| {diff:.1e}): {a_dir.name} {ra:,.0f} tok/s vs "
          f"{b_dir.name} {rb:,.0f} tok/s ({b[0]['method']}) -> {ra / rb:.2f}x "
          f"(measured on this machine; other load on it shows up in both)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
