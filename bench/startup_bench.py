"""What a read command costs as a whole process, against the floor of any DuckDB tool: `kledger
status` and `kledger log -n 20` on a ledger, each paired with `python -c "import duckdb"` run just
before it (the pair sees the same machine load), median over --repeat pairs. Also the import
profile of the CLI: which of its imports cost most (python -X importtime).

    python bench/startup_bench.py [--ledger DIR] [--repeat 9] [--json FILE]

Without --ledger it makes a small one (facts only, no model: 20 commits of 5 facts) in a
temporary folder. The issue's target: each command ≤ 2.5× the import of duckdb.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KLEDGER = [sys.executable, "-m", "kledger"]


def run(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def small_ledger(root: Path) -> Path:
    subprocess.run(KLEDGER + ["init", "--model", "none"], cwd=root, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    sys.path.insert(0, str(ROOT))
    from kledger.ledger import Ledger
    from kledger.records import Fact

    lg = Ledger.open(root, write=True)
    try:
        for c in range(20):
            lg.add([Fact(subject=f"Thing {c}-{i}", prompt=f"Thing {c}-{i} is made of", target=f"stuff{i}")
                    for i in range(5)])
            lg.commit(f"commit {c}", author="bench")
    finally:
        lg.close()
    return root


def import_profile(where: Path) -> list[tuple[str, int]]:
    """(module, cumulative µs) of the slowest top-level imports of `kledger status`."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "kledger", "status"], cwd=where,
                       capture_output=True, text=True, check=True)
    rows = []
    for line in p.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2]
            if len(name) - len(name.lstrip()) <= 3:  # top-level and first-level imports
                rows.append((name.strip(), int(parts[1])))
    return sorted(rows, key=lambda r: -r[1])[:8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ledger", default=None, help="a folder holding a ledger (default: a small new one)")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    where = Path(a.ledger) if a.ledger else small_ledger(Path(tmp.name))
    os.environ.setdefault("KLEDGER_NO_COLOR", "1")
    commands = {"status": KLEDGER + ["status"], "log -n 20": KLEDGER + ["log", "-n", "20"]}
    floor = [sys.executable, "-c", "import duckdb"]
    for cmd in commands.values():  # warm the file cache
        run(cmd, where)
    out: dict = {"ledger": str(where) if a.ledger else "small (20 commits of 5 facts)", "repeat": a.repeat,
                 "python": sys.version.split()[0], "commands": {}}
    for name, cmd in commands.items():
        pairs = [(run(floor, where), run(cmd, where)) for _ in range(a.repeat)]
        ratio = statistics.median(c / f for f, c in pairs)
        out["commands"][name] = {"median_s": round(statistics.median(c for _, c in pairs), 3),
                                 "import_duckdb_median_s": round(statistics.median(f for f, _ in pairs), 3),
                                 "ratio": round(ratio, 2)}
        print(f"kledger {name}: {out['commands'][name]['median_s']:.3f} s, "
              f"{ratio:.2f}x `python -c 'import duckdb'` ({out['commands'][name]['import_duckdb_median_s']:.3f} s), "
              f"median of {a.repeat} pairs")
    out["slowest_imports_us"] = import_profile(where)
    print("slowest imports of `kledger status` (cumulative µs):",
          ", ".join(f"{n} {us}" for n, us in out["slowest_imports_us"]))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
