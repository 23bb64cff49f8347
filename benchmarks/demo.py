"""Where the time of `make demo` goes: one line per phase, against the 60 s target.

`make demo` runs the default study (configs/digits.yaml) and its audit as two
`mlflow run` jobs. This benchmark runs the same work twice, each time into a
fresh temporary SQLite store, so that every phase can be timed:

1. **as `make demo` does**: `mlflow run mlproject -e study` then `-e audit`
   (the total a user waits for, from an installed venv);
2. **phase by phase**: the interpreter and package import
   (`compbias --version`); Ray's start-up and shut-down in this process
   (`ray.init(address="local")`); `compbias study` (its own timer splits the
   wall time into tracking and the rest, which is training, compression and
   evaluation on Ray workers); `compbias audit --json` (its own timer splits
   fetch, compute and log).

The difference between the two totals is what `mlflow run` itself costs (its
CLI start-up, the project's environment set-up and the run it creates).
Timings are printed, never asserted; a busy machine makes every phase slower.

    .venv/bin/python benchmarks/demo.py [--config configs/digits.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET_S = 60.0


def _env(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    env["COMPBIAS_ARTIFACT_ROOT"] = str(store / "mlartifacts")
    env["COMPBIAS_CACHE_DIR"] = str(store / "cache")
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    env["MPLBACKEND"] = "Agg"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def as_make_demo(config: str) -> tuple[float, float]:
    """The two `mlflow run` jobs of `make demo`, into a fresh store; the seconds of each."""
    with tempfile.TemporaryDirectory(prefix="cb-demo-") as tmp:
        env = _env(Path(tmp))
        mlflow = str(BIN / "mlflow")
        s1, _ = _timed([mlflow, "run", "mlproject", "-e", "study", "--env-manager", "local", "-P", f"config={config}"], env)
        s2, _ = _timed([mlflow, "run", "mlproject", "-e", "audit", "--env-manager", "local", "-P", "study=digits"], env)
        return s1, s2


def ray_start_stop() -> float:
    """Seconds for ray.init(address="local") and ray.shutdown() in this process."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.shutdown()
    return time.perf_counter() - t0


def phases(config: str) -> dict[str, float]:
    """Every phase of the same work, run through the compbias CLI into a fresh store."""
    out: dict[str, float] = {}
    cb = str(BIN / "compbias")
    with tempfile.TemporaryDirectory(prefix="cb-demo-") as tmp:
        env = _env(Path(tmp))
        out["import"], _ = _timed([cb, "--version"], env)
        out["ray start+stop"] = ray_start_stop()
        total, text = _timed([cb, "study", config], env)
        out["(study CLI total)"] = total
        m = re.search(r"in ([0-9.]+)s \(tracking ([0-9.]+)%\)", text)
        if not m:
            raise SystemExit(f"could not read the study's own timer from its output:\n{text[-1500:]}")
        wall, share = float(m.group(1)), float(m.group(2)) / 100.0
        out["study: tracking"] = wall * share
        out["study: training, compression, evaluation (Ray tasks)"] = wall * (1 - share)
        out["study: process start-up, Ray start, set-up"] = total - wall
        total, text = _timed([cb, "audit", "--study", "digits", "--json"], env)
        timings: dict[str, float] = {}
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                for k, v in (json.loads(line).get("timings") or {}).items():
                    timings[k] = timings.get(k, 0.0) + float(v)
        for k in ("fetch", "compute", "log"):
            out[f"audit: {k}"] = timings.get(k, 0.0)
        out["audit: process start-up"] = total - sum(timings.values())
        out["(audit CLI total)"] = total
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits.yaml")
    args = p.parse_args(argv)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    print(f"make-demo benchmark: {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    job_study, job_audit = as_make_demo(args.config)
    demo = job_study + job_audit
    parts = phases(args.config)
    print(f"\n{'phase':58s} {'seconds':>8s} {'share':>6s}")
    for k, v in parts.items():
        if not k.startswith("("):
            print(f"{k:58s} {v:8.1f} {v / demo:6.1%}")
    for name, job, cli in (("study", job_study, parts["(study CLI total)"]), ("audit", job_audit, parts["(audit CLI total)"])):
        print(f"{'mlflow run -e ' + name + ': job minus the same CLI run':58s} {job - cli:8.1f} {(job - cli) / demo:6.1%}"
              f"   (job {job:.1f} s, CLI {cli:.1f} s)")
    print(f"\nmake demo (two mlflow run jobs): {demo:.1f} s = {demo / TARGET_S:.2f}x the {TARGET_S:.0f} s target "
          f"(Ray start+stop alone: {parts['ray start+stop']:.1f} s, measured separately; import alone: {parts['import']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
