"""Speed and memory budget of scm-token-cache, measured side by side in one run.

Each pair is run alternately (A, B, A, B, ...) for ROUNDS rounds so that machine
noise hits both sides alike; the report gives the medians, the median of the
per-round ratios A/B, and whether each budget holds. Absolute times vary by machine; the ratios are the
point.

  cached run    vs  python -c pass           budget 2.5x (aim 2x), memory 1.5x
  cached token  vs  python -c pass           budget 2.5x (aim 2x), memory 1.5x
  refresh       vs  a bare requests.post     budget 1.2x
                    script doing the same request

Usage: python bench/benchmark.py [--rounds N]   (make bench)
Exit status: 0 when every budget holds, 1 otherwise.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fake_scm import FakeSCM  # noqa: E402

TOOL = os.path.join(ROOT, "scm_token_cache.py")
BARE_POST = """
import sys, requests
url, client_id, secret, scope = sys.argv[1:5]
response = requests.post(url, auth=(client_id, secret), data={"grant_type": "client_credentials", "scope": scope},
                         timeout=30)
response.raise_for_status()
assert response.json()["access_token"]
"""


# Peak memory is the child's own VmHWM, read at exit by a sitecustomize hook on PYTHONPATH (the same on
# both sides). getrusage's ru_maxrss would not do: it counts the memory of this process at the fork.
MEMORY_HOOK = """
import atexit, os

def _report_peak_memory():
    with open("/proc/self/status") as status, open(os.environ["BENCH_MEMORY_FILE"], "a") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")) + "\\n")

atexit.register(_report_peak_memory)
"""


def measure_time(command: list[str], env: dict) -> float:
    """Run once; return wall seconds."""
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(command[:3])} ... exited {completed.returncode}")
    return elapsed


def measure_memory(command: list[str], env: dict, hook_dir: str) -> int:
    """Run once with the memory hook; return the child's peak RSS in KiB."""
    report = os.path.join(hook_dir, "peak.txt")
    if os.path.exists(report):
        os.unlink(report)
    measure_time(command, {**env, "PYTHONPATH": hook_dir, "BENCH_MEMORY_FILE": report})
    with open(report) as f:
        return int(f.read().split()[-1])


def compare(name: str, a: list[str], b: list[str], env: dict, rounds: int, hook_dir: str) -> dict:
    """Alternate A and B; return medians of time and of peak memory for both."""
    times_a, times_b, memory_a, memory_b = [], [], [], []
    measure_time(a, env), measure_time(b, env)  # warm the page cache for both
    for _ in range(rounds):
        times_a.append(measure_time(a, env))
        times_b.append(measure_time(b, env))
    for _ in range(5):
        memory_a.append(measure_memory(a, env, hook_dir))
        memory_b.append(measure_memory(b, env, hook_dir))
    return {"name": name, "a": statistics.median(times_a), "b": statistics.median(times_b),
            # the median of the paired ratios: each A is compared with the B run right after it
            "ratio": statistics.median(a / b for a, b in zip(times_a, times_b)),
            "mem_a": statistics.median(memory_a), "mem_b": statistics.median(memory_b)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="rounds per pair (at least 20; default 25)")
    rounds = max(20, parser.parse_args().rounds)

    fake = FakeSCM().start()
    with tempfile.TemporaryDirectory(prefix="scm-token-cache-bench-") as work:
        config = os.path.join(work, "scm-auth.json")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(fake.config(), f, indent=2)
        env = {**os.environ, "REQUESTS_CA_BUNDLE": fake.write_ca(os.path.join(work, "ca.pem")),
               "NO_PROXY": "127.0.0.1,localhost"}
        env.pop("SCM_CONFIG_PATH", None)
        hook_dir = os.path.join(work, "hook")
        os.mkdir(hook_dir)
        with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
            f.write(MEMORY_HOOK)
        python = sys.executable
        baseline = [python, "-c", "pass"]
        subprocess.run([python, TOOL, "run", "--config", config], env=env, check=True, capture_output=True)

        results = [
            compare("cached run", [python, TOOL, "run", "--config", config], baseline, env, rounds, hook_dir),
            compare("cached token", [python, TOOL, "token", "--config", config], baseline, env, rounds, hook_dir),
            compare("refresh", [python, TOOL, "run", "--force", "--config", config],
                    [python, "-c", BARE_POST, fake.url, fake.client_id, fake.client_secret, fake.scope],
                    env, rounds, hook_dir),
        ]
        requests_made = len(fake.requests)
    fake.stop()

    budgets = {"cached run": (2.5, 1.5), "cached token": (2.5, 1.5), "refresh": (1.2, None)}
    print(f"python {sys.version.split()[0]} on {os.uname().sysname} {os.uname().machine}, {os.cpu_count()} cpus, "
          f"{rounds} alternating rounds, {requests_made} token requests served\n")
    print(f"{'comparison':<14}{'A median':>10}{'B median':>10}{'ratio':>8}{'budget':>8}  "
          f"{'A peak':>9}{'B peak':>9}{'ratio':>7}{'budget':>8}  verdict")
    all_met = True
    for result in results:
        time_budget, memory_budget = budgets[result["name"]]
        ratio = result["ratio"]
        memory_ratio = result["mem_a"] / result["mem_b"]
        met = ratio <= time_budget and (memory_budget is None or memory_ratio <= memory_budget)
        all_met &= met
        print(f"{result['name']:<14}{result['a'] * 1000:>8.1f}ms{result['b'] * 1000:>8.1f}ms{ratio:>7.2f}x"
              f"{time_budget:>7.1f}x  {result['mem_a'] / 1024:>7.1f}MB{result['mem_b'] / 1024:>7.1f}MB"
              f"{memory_ratio:>6.2f}x{(f'{memory_budget:.1f}x' if memory_budget else '-'):>8}  "
              f"{'met' if met else 'OVER BUDGET'}")
    print("\nA is scm-token-cache; B is python -c pass (cached rows) or a bare requests.post script (refresh).")
    print("every budget met" if all_met else "some budget NOT met")
    return 0 if all_met else 1


if __name__ == "__main__":
    raise SystemExit(main())
