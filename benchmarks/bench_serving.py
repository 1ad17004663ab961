"""Serving throughput: continuous batching against one request at a time, on loopback.

    python benchmarks/bench_serving.py                   # the shipped model, 16 clients, 48 tokens each
    python benchmarks/bench_serving.py --clients 8 --max-tokens 32 --slots 8
    python benchmarks/bench_serving.py --model-dir PATH --device cuda

Starts ``python -m llama_edu serve`` in a subprocess on a free loopback port (so the clients do
not share its interpreter), then sends the same requests (greedy, ``--max-tokens`` each, one
distinct prompt per client) two ways:

  sequential  one client, one request after the other: the server decodes one row at a time
  batched     ``--clients`` threads at once (httpx, one connection each): the batcher decodes
              them together, one forward pass per step for all of them

and prints, per way: requests answered, tokens generated, wall time, tokens/s, and the p50 and p99
of the request latencies (time from sending to the last byte; with 16 requests p99 is the
slowest one). "None lost": every request must come back 200 with the text its prompt gave
sequentially (greedy, so identical). The ratio of the tokens/s is the speed-up of batching.
Both ways run on the same server in the same run; ``--repeats`` runs each way again and keeps
the run with the median wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "HAMLET:\nTo be,", "O", "MENENIUS:\nWhat",
    "LADY MACBETH:", "Second Citizen:\nWe", "DUKE VINCENTIO:", "PETRUCHIO:\nI", "QUEEN ELIZABETH:",
    "BRUTUS:", "GLOUCESTER:\nNow", "CORIOLANUS:", "ISABELLA:\nI am",
]


def start_server(args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "llama_edu", "serve", "--port", "0", "--slots", str(args.slots)]
    cmd += [args.model_dir] if args.model_dir else []
    cmd += ["--device", args.device] if args.device else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    for line in proc.stderr:  # "serving NAME at URL with N slots ..."
        if line.startswith("serving "):
            name, url = line.split()[1], line.split(" at ")[1].split()[0]
            break
    else:
        raise SystemExit(f"the server did not start (exit status {proc.wait()})")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its stderr
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/models", timeout=5).status_code == 200:
                return proc, url, name
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def one_request(http: httpx.Client, name: str, prompt: str, max_tokens: int) -> tuple[float, str, int]:
    """(latency in s, text, completion tokens) of one greedy completion."""
    t0 = time.perf_counter()
    r = http.post("/completions", json={"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    latency = time.perf_counter() - t0
    r.raise_for_status()
    body = r.json()
    return latency, body["choices"][0]["text"], body["usage"]["completion_tokens"]


def sequential(url: str, name: str, prompts: list[str], max_tokens: int) -> dict:
    results = []
    with httpx.Client(base_url=url, timeout=120) as http:
        t0 = time.perf_counter()
        for p in prompts:
            results.append(one_request(http, name, p, max_tokens))
        wall = time.perf_counter() - t0
    return dict(wall=wall, results=results)


def batched(url: str, name: str, prompts: list[str], max_tokens: int) -> dict:
    results: list = [None] * len(prompts)
    clients = [httpx.Client(base_url=url, timeout=120) for _ in prompts]
    for c in clients:  # open the connections first: the timing starts with every client ready
        c.get("/models").raise_for_status()
    barrier = threading.Barrier(len(prompts) + 1)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = one_request(clients[i], name, prompts[i], max_tokens)
        except Exception as e:  # noqa: BLE001 - a lost request is reported, not raised in a thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(300)
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return dict(wall=wall, results=results)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method (p99 of 16 values is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="default: data/shakespeare-llama")
    parser.add_argument("--device", default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--slots", type=int, default=16, help="the server's --slots (default: --clients)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(args.clients)]

    proc, url, name = start_server(args)
    try:
        one_request(httpx.Client(base_url=url, timeout=120), name, "O", 4)  # warm-up
        runs = {"sequential": [], "batched": []}
        for _ in range(args.repeats):  # interleaved, so other load on the machine hits both alike
            runs["sequential"].append(sequential(url, name, prompts, args.max_tokens))
            runs["batched"].append(batched(url, name, prompts, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(30)

    reference = [text for _, text, _ in runs["sequential"][0]["results"]]
    print(f"{name} on {args.device or 'the default device'}: {args.clients} requests x {args.max_tokens} tokens "
          f"(greedy), server --slots {args.slots}, loopback, {os.cpu_count()} CPU cores\n")
    print(f"{'way':<11} {'answered':>8} {'lost':>4} {'tokens':>6} {'wall s':>7} {'tokens/s':>9} {'p50 s':>6} {'p99 s':>6}")
    speed = {}
    for way, candidates in runs.items():
        run = sorted(candidates, key=lambda r: r["wall"])[len(candidates) // 2]
        ok = [r for r in run["results"] if isinstance(r, tuple)]
        right = sum(1 for r, ref in zip(run["results"], reference) if isinstance(r, tuple) and r[1] == ref)
        tokens = sum(n for _, _, n in ok)
        latencies = [lat for lat, _, _ in ok]
        speed[way] = tokens / run["wall"]
        print(f"{way:<11} {right:>8} {len(prompts) - right:>4} {tokens:>6} {run['wall']:>7.2f} {speed[way]:>9.1f} "
              f"{percentile(latencies, 50):>6.2f} {percentile(latencies, 99):>6.2f}")
    print(f"\nbatched / sequential tokens/s: {speed['batched'] / speed['sequential']:.1f}x")


if __name__ == "__main__":
    main()
