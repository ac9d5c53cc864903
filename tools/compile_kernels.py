#!/usr/bin/env python
"""Compile every Triton kernel for a GPU architecture on this machine (no GPU needed).

    python tools/compile_kernels.py                        # what real launches try, sm_90
    python tools/compile_kernels.py --configs all --jobs 2 --output kernels_sm90.md
    python tools/compile_kernels.py --cases 'flash-bf16-d128' --configs all
    python tools/compile_kernels.py --list

Runs the kernels' host code on meta tensors at production shapes (Qwen2.5-7B / 0.5B heads,
16K tokens, 152K vocabulary), records each launch and compiles it with Triton's own compiler
and the ptxas bundled in the triton wheel (megatron_k15/kernels/cross_compile.py). Prints one
table row per compile: shared memory, registers, spill bytes, compile time; for autotuned
kernels whether a real launch would try the config (after our early_config_prune).

Exit status 1 when a config that a launch would try fails to compile or needs more shared
memory than the architecture has, or a launch is left with no config that fits; spills are
reported, and failed only above ``--max-spill BYTES`` per thread.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real; must precede importing the kernels
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: F401,E402


def _compile_case(job):
    name, which, arch = job
    from megatron_k15.kernels import cross_compile as cc

    cases = {c.name: c for c in cc.standard_cases()}
    out = []
    for case, launch, config, kept in cc.unique_jobs([cases[name]], which):
        out.append((case, cc.compile_launch(launch, config, arch=arch, kept=kept)))
    return out


def _problems(rows, arch, max_spill):
    """Lines naming every failure: tried configs that do not compile or fit, launches without
    a fitting tried config, and (with ``max_spill``) tried configs spilling more bytes."""
    problems = []
    by_launch = {}
    for case, r in rows:
        by_launch.setdefault((case, r.kernel), []).append(r)
        if r.kept and not r.fits(arch):
            why = r.error if not r.ok else f"{r.shared} B of shared memory"
            problems.append(f"{case} {r.kernel} [{r.config}]: {why}")
        elif r.kept and max_spill is not None and r.spill > max_spill:
            problems.append(f"{case} {r.kernel} [{r.config}]: spills {r.spill} B > {max_spill}")
    for (case, kernel), results in by_launch.items():
        if not any(r.kept and r.fits(arch) for r in results):
            problems.append(f"{case} {kernel}: no tried config compiles and fits")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--configs", choices=("kept", "all", "first"), default="kept",
                   help="autotune configs to compile: those a launch tries (kept), every "
                        "candidate (all, also shows what the prune drops), or the first tried")
    p.add_argument("--cases", default=None, help="regular expression selecting case names")
    p.add_argument("--jobs", type=int, default=1, help="compile processes")
    p.add_argument("--output", default=None, help="also write the table to this file")
    p.add_argument("--max-spill", type=int, default=None, metavar="BYTES",
                   help="a tried config spilling more than BYTES per thread is a problem")
    p.add_argument("--fresh-cache", action="store_true",
                   help="compile into an empty Triton cache (true compile times; otherwise a "
                        "config already in the disk cache shows ~0 s)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")

    from megatron_k15.kernels import cross_compile as cc

    cc.check_interpreter_off()
    missing = cc.compiler_api_missing()
    if missing:
        print(f"error: cannot cross-compile with this triton ({missing})", file=sys.stderr)
        return 3
    names = [c.name for c in cc.standard_cases()]
    if args.cases:
        try:
            pattern = re.compile(args.cases)
        except re.error as e:
            p.error(f"--cases is not a regular expression: {e}")
        names = [n for n in names if pattern.search(n)]
        if not names:
            p.error(f"--cases {args.cases!r} matches no case; --list shows them")
    if args.list:
        print("\n".join(names))
        return 0

    import signal
    import tempfile

    if args.fresh_cache:  # read by Triton at compile time; spawned workers inherit it
        import atexit
        import shutil

        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_")
        atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    jobs = [(n, args.configs, args.arch) for n in names]
    rows = []
    pool = None
    if args.jobs == 1:
        results = map(_compile_case, jobs)
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.jobs)
        results = pool.imap(_compile_case, jobs)
    print("\n".join(cc.format_table([], args.arch).splitlines()[:2]), flush=True)
    try:
        for i, case_rows in enumerate(results, 1):  # rows stream out as each case finishes
            rows.extend(case_rows)
            print("\n".join(cc.format_table(case_rows, args.arch).splitlines()[2:]), flush=True)
            bad = sum(1 for _, r in case_rows if r.kept and not r.fits(args.arch))
            print(f"[{i}/{len(jobs)}] {jobs[i - 1][0]}: {len(case_rows)} compiles"
                  f"{f', {bad} failing' if bad else ''} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        if pool is not None:  # also on Ctrl-C / SIGTERM: no compile process left running
            pool.terminate()
    table = cc.format_table(rows, args.arch)
    problems = _problems(rows, args.arch, args.max_spill)
    spills = sum(1 for _, r in rows if r.kept and r.ok and r.spill)
    summary = (f"\n{len(rows)} compiles for sm_{args.arch} in {time.perf_counter() - t0:.0f} s; "
               f"{len(problems)} problems; {spills} tried configs spill registers")
    print(summary)
    for line in problems:
        print(f"PROBLEM {line}")
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(table + "\n" + summary + "\n" + "".join(f"PROBLEM {x}\n" for x in problems))
        os.replace(tmp, args.output)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
