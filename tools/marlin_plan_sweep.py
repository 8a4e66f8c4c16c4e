"""Times marlin_gemm's kernel under forced launch plans (JAXQ_MARLIN_PLAN="tiles,splits": 64-column tiles
per block, blocks per K split) on the decode shapes, one child process per plan, to tune PlanMarlin.

    python tools/marlin_plan_sweep.py            # prints one table: shape, M, plan, µs, % of copy bandwidth
"""
import json
import os
import subprocess
import sys

SHAPES = [(8192, 28672), (28672, 8192), (4096, 14336), (4096, 4096), (4096, 1024)]
ROWS = (1, 16)
PLANS = ["default", "1,1", "1,2", "1,4", "1,8", "2,2", "2,4", "4,1", "4,2", "4,4", "4,7", "4,8"]


def child():
    import jax
    import jax.numpy as jnp

    import jaxq
    from jaxq import bench

    copy = bench.copy_bandwidth()
    out = []
    for k, n in SHAPES:
        moved = k * n // 2 + k // 128 * n * 2
        for m in ROWS:
            def make(i, m=m, k=k, n=n):
                x = jax.random.normal(jax.random.key(i), (m, k), jnp.float32).astype(jnp.bfloat16)
                return (x, *bench._marlin_weight("uint4b8", k, n, i)[:2])

            t = bench._time_per_call(lambda x, q, s: jaxq.marlin_gemm(x, q, s, b_q_type="uint4b8"), make, moved)
            out.append(dict(k=k, n=n, m=m, us=t * 1e6, pct=100 * moved / t / copy))
    print(json.dumps(out))


def main():
    rows = {}
    for plan in PLANS:
        env = dict(os.environ)
        if plan != "default":
            env["JAXQ_MARLIN_PLAN"] = plan
        done = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"plan {plan}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        for r in json.loads(done.stdout.strip().splitlines()[-1]):
            rows.setdefault((r["k"], r["n"], r["m"]), []).append((plan, r["us"], r["pct"]))
        print(f"plan {plan} done", flush=True)
    print("| K | N | M | plan (tiles,splits) | µs | % of copy BW |\n|---|---|---|---|---|---|")
    for (k, n, m), results in rows.items():
        for plan, us, pct in sorted(results, key=lambda r: r[1]):
            print(f"| {k} | {n} | {m} | {plan} | {us:.1f} | {pct:.1f}% |")


if __name__ == "__main__":
    child() if sys.argv[1:] == ["--child"] else main()
