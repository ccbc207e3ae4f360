"""Summarizes a ptxas -v report (from a build log on stdin): one line per kernel and arch with
registers, stack frame and spills. Exit status 1 when any kernel spills (or uses a stack frame
with --strict-stack); with --fail-arch sm_90 only that arch's spills fail, others are listed;
with --archs "sm_75 sm_80 ..." also when the report lacks one of those archs or has another
(PTX-only compute_XY names are ignored: ptxas does not run for them). Used by
scripts/check_cuda_build.sh and benchmarks/gpu_check.sh."""
import re
import subprocess
import sys


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def main():
    strict_stack = "--strict-stack" in sys.argv
    fail_arch = sys.argv[sys.argv.index("--fail-arch") + 1] if "--fail-arch" in sys.argv else None
    archs = sys.argv[sys.argv.index("--archs") + 1].split() if "--archs" in sys.argv else None
    entries, cur = [], None
    for line in sys.stdin:
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            entries.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
    names = demangle([e["name"] for e in entries])
    bad = 0
    seen = set()
    for e, n in zip(entries, names):
        n = re.sub(r"purified_ops::cuda::", "", n)
        n = re.sub(r"\(.*\)$", "", n)
        key = (n, e["arch"])
        if key in seen:
            continue
        seen.add(key)
        spill = e.get("spill_st", 0) + e.get("spill_ld", 0)
        flag = ""
        if spill or (strict_stack and e.get("stack", 0)):
            flag = "  <-- SPILL" if spill else "  <-- STACK"
            if fail_arch is None or e["arch"] == fail_arch:
                bad += 1
            else:
                flag += f" (not {fail_arch}: reported, not failed)"
        print(f"{e['arch']:7} {n:55} regs {e.get('regs', -1):3}  stack {e.get('stack', 0):4} B  "
              f"spill st/ld {e.get('spill_st', 0)}/{e.get('spill_ld', 0)} B{flag}")
    scope = f" on {fail_arch}" if fail_arch else ""
    reported = sorted({arch for _, arch in seen}, key=lambda a: int(re.sub(r"\D", "", a)))
    print(f"{len(seen)} kernels on {' '.join(reported) or 'no arch'}, {bad} with spills"
          f"{' or stack' if strict_stack else ''}{scope}")
    if not seen:
        print("no ptxas report found (build with PURIFIED_OPS_PTXAS_VERBOSE=1)")
        return 2
    if archs is not None:
        expected = sorted({a for a in archs if a.startswith("sm_")}, key=lambda a: int(re.sub(r"\D", "", a)))
        if reported != expected:
            print(f"the report covers {' '.join(reported)}, the build {' '.join(expected)}")
            return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
