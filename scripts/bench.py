"""Runs every benchmark listed in BENCHMARKS and writes its section of docs/benchmarks.md.

    make bench                          # = python3 scripts/bench.py
    python3 scripts/bench.py adapter    # only the benchmarks named
    python3 scripts/bench.py --list

Each benchmark is a script in scripts/ that runs as its own process (so one benchmark's
imports and threads never leak into another's timings), prints its table, and replaces its
own `##` section of docs/benchmarks.md between `<!-- bench:<name>:start/end -->` markers
with `update_section()` below. A listed script that does not exist yet is skipped with a
note; a script that fails makes this command exit non-zero.

Helpers for benchmark scripts (`from bench import update_section, machine_info`; scripts/ is
on sys.path when a script in it runs): `update_section` and `machine_info`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"

# name -> (script, what it measures). Add a line here to make `make bench` run a new benchmark.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "adapter": (
        "scripts/bench_adapter.py",
        "thin adapter: `align train` vs the same training on TRL directly",
    ),
    "ppo": ("scripts/bench_ppo.py", "PPO"),
    "ppo-memory": ("scripts/bench_ppo_memory.py", "PPO memory: the four roles and the cheap options"),
}

DOC_HEADER = """# Benchmarks

Reproduce every table below with `make bench` (it runs `python3 scripts/bench.py`, which runs
each benchmark script listed in the `BENCHMARKS` table at the top of that file, one process
each). One benchmark alone: `python3 scripts/bench.py <name>`. Each `##` section is written by
its own script between `bench:<name>` markers, so re-running a benchmark replaces only its
section. The numbers are from the machine named in each section; on a shared machine, re-run
when a figure looks noisy.
"""


def update_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replaces (or appends) one benchmark's section of docs/benchmarks.md.

    Args:
        name: the benchmark's key in BENCHMARKS; the section sits between
            `<!-- bench:<name>:start -->` and `<!-- bench:<name>:end -->`.
        markdown: the whole section, starting with its `## ` heading.
        doc: the file to update (created with the shared header when missing).
    """
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else DOC_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # The tables this writes are not a change to the code they measure.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uall", "--", ".", ":!docs/benchmarks.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
        return sha + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(packages: tuple[str, ...] = ("torch", "transformers", "trl", "datasets")) -> str:
    """One markdown line: date, CPU, core count, Python and package versions, git revision."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for pkg in packages:
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at the end"
    return (
        f"{datetime.date.today().isoformat()}, {_cpu_model()}, {os.cpu_count()} CPU cores{load}, "
        f"Python {platform.python_version()}, {', '.join(versions)}, align at {_git_revision()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    opts = parser.parse_args()
    if opts.list:
        for name, (script, what) in BENCHMARKS.items():
            state = "" if (ROOT / script).exists() else "  (not written yet)"
            print(f"{name:<10} {script:<28} {what}{state}")
        return 0
    unknown = [n for n in opts.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    failed = []
    for name in opts.names or list(BENCHMARKS):
        script, what = BENCHMARKS[name]
        if not (ROOT / script).exists():
            print(f"bench: {name}: {script} does not exist yet, skipped", flush=True)
            continue
        print(f"bench: {name}: {what} ({script})", flush=True)
        started = time.perf_counter()
        # Output streams through: the script prints its progress and its table.
        code = subprocess.run([sys.executable, str(ROOT / script)], cwd=ROOT).returncode
        print(
            f"bench: {name}: {'done' if code == 0 else f'FAILED (exit {code})'} "
            f"in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        if code != 0:
            failed.append(name)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"bench: tables written to {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
