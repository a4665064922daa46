"""Markdown tables from the benchmark JSON in benchmarks/results/ (for the README).

python benchmarks/report.py benchmarks/results/token_pool_h100.json
"""

import json
import sys
from collections import OrderedDict


def table(path: str) -> str:
    data = json.load(open(path))
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for r in data["results"]:
        groups.setdefault(r["group"], {})[r["backend"]] = r
    backends = []
    for by in groups.values():
        for b in by:
            if b not in backends:
                backends.append(b)
    unit = data["results"][0]["unit"]
    head = (
        "| case | floor ms | "
        + " | ".join(f"{b} ms ({unit})" for b in backends)
        + " | cuda vs best peer | triton / cuda |"
    )
    lines = [head, "|" + " --- |" * (len(backends) + 4)]
    for group, by in groups.items():
        cells = []
        for b in backends:
            r = by.get(b)
            ok = r is not None and r["ms"] == r["ms"]
            cells.append(f"{r['ms']:.3f} ({r['rate']:.2f})" if ok else "–")
        peers = {b: r for b, r in by.items() if b not in ("cuda", "triton") and r["ms"] == r["ms"]}
        best = min(peers.values(), key=lambda r: r["ms"]) if peers else None
        ratio = (
            f"{best['ms'] / by['cuda']['ms']:.2f}x ({best['backend']})"
            if best and "cuda" in by
            else "–"
        )
        tri = (
            f"{by['cuda']['ms'] / by['triton']['ms']:.0%}"
            if "cuda" in by and "triton" in by
            else "–"
        )
        floor = next((r.get("floor_ms") for r in by.values() if r.get("floor_ms")), None)
        lines.append(f"| {group} | {floor:.3f} | " + " | ".join(cells) + f" | {ratio} | {tri} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
        print()
