"""A time-bounded fuzz campaign over every op, back end and module (issue #9).

    python scripts/fuzz_campaign.py --seconds 240 --out report.json [--device cuda|cpu]
    python scripts/fuzz_campaign.py --replay SEED [--device ...] [--small]   # re-run one case

Loops drawing random cases (tests/fuzz_cases.py: the same draws and checks as tests/test_fuzz.py,
which reuse the per-op tests' checkers against float64 references, forward and backward) until the
time is up, spreading it evenly over the (op, back end) targets that can run here: each next case
goes to the target that has used the least time so far, so a target whose first cases compile
Triton kernels gets fewer cases, not more time. Every case has its own seed, which encodes the
target (``seed % 64`` indexes :data:`TARGETS`) and draws everything else; ``--replay SEED``
rebuilds and re-runs exactly that case.

Warm-up (``--warmup N``, default 1 on cuda, 0 on cpu): before the loop, every target first runs N
cases drawn with the short lengths of :func:`fuzz_cases.small_limits` (the same head dims, widths
and dtypes as the timed draws, so they compile kernels the timed cases use), outside the time
balance: on a GPU a Triton target's first cases mostly compile kernels, and that compile time was
charged to its share (1-7 cases per Triton target in 140 s on the H100). Each warm-up case compiles
the kernels of one drawn configuration; a larger N covers more of them. The warm-up still counts
against ``--seconds``; its failures are recorded like any other (marked ``"warmup": true``, replayed
with ``--small``), its cases count in ``cases`` and ``by_dtype`` but its time goes to
``warmup_seconds``, not ``seconds``.

The JSON report (written every ``--every`` cases, at the end, and on SIGTERM/SIGINT, atomically)
holds the environment, per-target and per-dtype case counts and times, and each failure with its
seed, case and error. Exit status: 0 when no case failed, 1 otherwise, 2 on a broken CUDA context
(a sticky CUDA error ends the campaign: later cases would all fail for the same reason).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=240.0, help="time budget (default 240)")
    p.add_argument("--out", default="fuzz_campaign.json", help="report path")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=None, help="master seed (default: from the clock)")
    p.add_argument("--replay", type=int, default=None, metavar="SEED", help="re-run one case")
    p.add_argument(
        "--small",
        action="store_true",
        help="with --replay: the case of a warm-up seed (drawn with short lengths)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        metavar="N",
        help="small cases per target before the timed loop, outside the time balance "
        "(default: 1 on cuda, 0 on cpu)",
    )
    p.add_argument("--ops", default=None, help="comma-separated ops to fuzz (default: all)")
    p.add_argument("--every", type=int, default=20, help="write the report every N cases")
    p.add_argument("--max-failures", type=int, default=200, help="failures kept in the report")
    return p.parse_args()


ARGS = _parse()
if ARGS.device is None:
    import torch  # noqa: E402

    ARGS.device = "cuda" if torch.cuda.is_available() else "cpu"
if ARGS.warmup is None:
    ARGS.warmup = 1 if ARGS.device == "cuda" else 0
if ARGS.warmup < 0:
    raise SystemExit("--warmup must be >= 0")
if ARGS.device == "cpu":
    # The Triton kernels run in the interpreter on the CPU; it must be on before triton imports.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fuzz_cases as fc  # noqa: E402
import torch  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops import _backend  # noqa: E402

# Every (op, back end) pair, in a fixed order independent of what this machine can run, so a seed
# names its target anywhere: seed % 64 is the index here.
TARGETS = [(op, b) for op in fc.OPS for b in ("torch", "triton", "cuda")]
assert len(TARGETS) <= 64


def case_seed(rng: random.Random, target: int) -> int:
    return rng.randrange(1, 2**40) * 64 + target


def target_of(seed: int) -> tuple[str, str]:
    return TARGETS[seed % 64]


def environment(device: str) -> dict:
    env = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "crosslmm_ops": crosslmm_ops.__version__,
        "extension_archs": _backend.extension_archs(),
        "triton_interpreted": _backend.triton_interpreted(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["CROSSLMM_ATTENTION_SM90"] = os.environ.get("CROSSLMM_ATTENTION_SM90")
    return env


def draw_case(seed: int, limits) -> dict:
    """The case of ``seed``: its target from ``seed % 64``, everything else from the seed."""
    op, backend = target_of(seed)
    return fc.OPS[op][0](fc.RandomDrawer(seed), backend, limits)


def replay_command(seed: int, device: str, small: bool) -> str:
    return f"python scripts/fuzz_campaign.py --replay {seed} --device {device}" + (
        " --small" if small else ""
    )


def run_case(seed: int, case: dict, device: str) -> None:
    op, backend = target_of(seed)
    fc.OPS[op][1](backend, case, device)


def _sticky_cuda_error(error: BaseException) -> bool:
    text = str(error)
    return any(
        s in text
        for s in (
            "illegal memory access",
            "CUDA error: an illegal",
            "unspecified launch failure",
            "misaligned address",
            "device-side assert",
        )
    )


class Campaign:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.limits = fc.limits_for(self.device)
        self.small_limits = fc.small_limits(self.limits)
        ops = args.ops.split(",") if args.ops else list(fc.OPS)
        unknown = set(ops) - set(fc.OPS)
        if unknown:
            raise SystemExit(f"unknown ops {sorted(unknown)}; known: {list(fc.OPS)}")
        self.targets = [
            i
            for i, (op, b) in enumerate(TARGETS)
            if op in ops and b in fc.runnable_backends(op, self.device)
        ]
        self.spent = {i: 0.0 for i in self.targets}
        self.stats: dict[str, dict] = {}
        self.failures: list[dict] = []
        self.failed = 0
        self.cases = 0
        self.warmup_cases = 0
        self.warmup_failed = 0
        self.warmup_seconds = 0.0
        self.started = time.time()
        self.master = args.seed if args.seed is not None else int(time.time() * 1000) % 2**31
        self.rng = random.Random(self.master)
        self.stopped_by = None
        self.aborted = None

    def _entry(self, target: int) -> dict:
        op, backend = TARGETS[target]
        return self.stats.setdefault(
            f"{op}[{backend}]",
            {
                "op": op,
                "backend": backend,
                "cases": 0,
                "failures": 0,
                "seconds": 0.0,
                "by_dtype": {},
                "warmup_cases": 0,
                "warmup_seconds": 0.0,
            },
        )

    def record(self, target, seed, case, seconds, error, warmup=False):
        """One case's result. ``cases``, ``failures`` and ``by_dtype`` count every case checked;
        ``seconds`` (and the balance) only the timed loop's, the warm-up's go to ``warmup_*``."""
        e = self._entry(target)
        e["cases"] += 1
        dt = str(case.get("dtype", "?")) if case else "?"
        d = e["by_dtype"].setdefault(dt, {"cases": 0, "failures": 0})
        d["cases"] += 1
        self.cases += 1
        if warmup:
            e["warmup_cases"] += 1
            e["warmup_seconds"] = round(e["warmup_seconds"] + seconds, 3)
            self.warmup_cases += 1
            self.warmup_seconds += seconds
        else:
            e["seconds"] = round(e["seconds"] + seconds, 3)
            self.spent[target] += seconds
        if error is not None:
            e["failures"] += 1
            d["failures"] += 1
            self.failed += 1
            self.warmup_failed += warmup
            if len(self.failures) < self.args.max_failures:
                op, backend = TARGETS[target]
                self.failures.append(
                    {
                        "op": op,
                        "backend": backend,
                        "seed": seed,
                        "replay": replay_command(seed, self.device, warmup),
                        "case": fc.describe(case) if case else None,
                        "error": f"{type(error).__name__}: {error}"[:1500],
                        "where": "".join(traceback.format_tb(error.__traceback__)[-3:])[-1500:],
                        **({"warmup": True} if warmup else {}),
                    }
                )

    def report(self) -> dict:
        elapsed = time.time() - self.started
        return {
            "kind": "crosslmm-ops fuzz campaign (scripts/fuzz_campaign.py)",
            "environment": environment(self.device),
            "master_seed": self.master,
            "budget_s": self.args.seconds,
            "elapsed_s": round(elapsed, 1),
            "stopped_by": self.stopped_by,
            "aborted": self.aborted,
            "totals": {
                "cases": self.cases,
                "failures": self.failed,
                "targets": len(self.targets),
                "cases_per_s": round(self.cases / elapsed, 2) if elapsed else 0.0,
                "warmup_per_target": self.args.warmup,
                "warmup_cases": self.warmup_cases,
                "warmup_failures": self.warmup_failed,
                "warmup_s": round(self.warmup_seconds, 1),
            },
            "targets": dict(sorted(self.stats.items())),
            "failures": self.failures,
        }

    def write(self) -> None:
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.report(), indent=1, default=str))
        os.replace(tmp, path)

    def progress(self) -> None:
        elapsed = time.time() - self.started
        per = ", ".join(
            f"{k} {v['cases']}" + (f"/{v['failures']}F" if v["failures"] else "")
            for k, v in sorted(self.stats.items())
        )
        print(f"[{elapsed:6.1f}s] {self.cases} cases, {self.failed} failed | {per}", flush=True)

    def run_one(self, target: int, warmup: bool = False) -> bool:
        """Draw and check one case of ``target``; False when the campaign must stop."""
        seed = case_seed(self.rng, target)
        case, error = None, None
        t0 = time.time()
        try:
            case = draw_case(seed, self.small_limits if warmup else self.limits)
            run_case(seed, case, self.device)
        except Exception as exc:  # noqa: BLE001 - every exception is a failure of the case
            error = exc
        if self.device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001
                error = error or exc
        self.record(target, seed, case, time.time() - t0, error, warmup=warmup)
        if error is not None:
            op, backend = TARGETS[target]
            print(
                f"FAIL {op}[{backend}] seed {seed}{' (warm-up, --small)' if warmup else ''}: "
                f"{type(error).__name__}: {str(error)[:300]}",
                flush=True,
            )
            if self.device == "cuda" and _sticky_cuda_error(error):
                self.aborted = f"sticky CUDA error at seed {seed}; later cases cannot run"
                return False
        if self.cases % self.args.every == 0:
            self.write()
        return True

    def loop(self) -> None:
        if not self.targets:
            raise SystemExit("nothing to fuzz here")
        deadline = self.started + self.args.seconds
        last_print = 0.0
        print(
            f"fuzz campaign on {self.device}: {len(self.targets)} targets "
            f"({', '.join(f'{TARGETS[i][0]}[{TARGETS[i][1]}]' for i in self.targets)}), "
            f"{self.args.seconds:.0f} s, master seed {self.master}"
            f"{f', warm-up {self.args.warmup} per target' if self.args.warmup else ''}",
            flush=True,
        )
        # The warm-up: within the deadline, outside the balance (see the module docstring).
        for _ in range(self.args.warmup):
            for target in self.targets:
                if time.time() >= deadline or not self.run_one(target, warmup=True):
                    break
            else:
                continue
            break
        if self.args.warmup:
            print(
                f"[{time.time() - self.started:6.1f}s] warm-up: {self.warmup_cases} cases, "
                f"{self.warmup_failed} failed",
                flush=True,
            )
        while time.time() < deadline and not self.aborted:
            target = min(self.targets, key=lambda i: (self.spent[i], i))
            if not self.run_one(target):
                break
            if time.time() - last_print > 10:
                self.progress()
                last_print = time.time()
        self.stopped_by = self.stopped_by or ("abort" if self.aborted else "time")


def replay(args) -> int:
    op, backend = target_of(args.replay)
    limits = fc.limits_for(args.device)
    case = draw_case(args.replay, fc.small_limits(limits) if args.small else limits)
    print(
        f"replaying {op}[{backend}] on {args.device}{' (warm-up draw)' if args.small else ''}, "
        "case:"
    )
    print(json.dumps(fc.describe(case), default=str))
    try:
        run_case(args.replay, case, args.device)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    print("passed")
    return 0


def main() -> int:
    if ARGS.replay is not None:
        return replay(ARGS)
    campaign = Campaign(ARGS)

    def stop(signum, _frame):
        campaign.stopped_by = signal.Signals(signum).name
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        campaign.loop()
    except KeyboardInterrupt:
        campaign.stopped_by = campaign.stopped_by or "SIGINT"
        print(f"interrupted ({campaign.stopped_by}): writing the report", flush=True)
    finally:
        campaign.write()
    campaign.progress()
    print(f"report: {ARGS.out} ({campaign.cases} cases, {campaign.failed} failures)")
    if campaign.aborted:
        return 2
    return 1 if campaign.failed else 0


if __name__ == "__main__":
    sys.exit(main())
