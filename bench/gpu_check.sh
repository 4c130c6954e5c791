#!/usr/bin/env bash
# One pass on a GPU machine, offline: build the CUDA kernels in place, run the
# tests, a CUDA self-check and both benchmarks, and keep every log in $OUT.
#
#   bash bench/gpu_check.sh            # from anywhere; it works in the repository root
#   OUT=/tmp/run PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Needs torch (a CUDA build) and nvcc already installed; installs nothing. A
# failing step is recorded in $OUT/summary.txt and the next one still runs, so
# one call yields every result; the exit status is 1 if any step failed.
# Per-step time limits in seconds: BUILD_TIMEOUT (300), TEST_TIMEOUT (300), BENCH_TIMEOUT (240 each).
# The tests run on 12 processes where pytest-xdist is installed (PYTEST_ARGS overrides).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

if [[ -z "${CUDA_HOME:-}" && -f /usr/local/cuda/include/cuda_runtime.h ]]; then
    export CUDA_HOME=/usr/local/cuda
fi
# Without TORCH_CUDA_ARCH_LIST, setup.py builds for the visible GPUs only: the quickest build.
export FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# step NAME LIMIT CMD...: runs CMD with its output in $OUT/NAME.log and on the
# console, records its status and duration in the summary, and never stops the script.
step() {
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS rc=0 status=ok
    echo "=== $name: $*" | tee "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log" || rc=${PIPESTATUS[0]}
    if [[ $rc -eq 124 ]]; then
        status="FAILED (timed out after ${limit}s)"
    elif [[ $rc -ne 0 ]]; then
        status="FAILED (exit $rc)"
    fi
    [[ $rc -eq 0 ]] || FAILED=1
    printf '%-12s %-34s %5ds\n' "$name" "$status" $((SECONDS - start)) | tee -a "$SUMMARY"
}

step env 60 bash -c "nvidia-smi; echo; \"\${CUDA_HOME:-/usr/local/cuda}/bin/nvcc\" --version | tail -2; \
    \${CXX:-c++} --version | head -1; \
    $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'"

step build "${BUILD_TIMEOUT:-300}" "$PYTHON" setup.py build_ext --inplace

step build_info 60 "$PYTHON" -c "import json, dsq_ext; i = dsq_ext.build_info(); \
print(json.dumps(i)); \
print('libstdc++ in the process:', sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l})); \
assert 'CUDA' in i['backends'], 'the CUDA kernels are not registered'"

if [[ -z "${PYTEST_ARGS+x}" ]]; then
    PYTEST_ARGS=""
    "$PYTHON" -c "import xdist" 2>/dev/null && PYTEST_ARGS="-n 12"
fi
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
step tests "${TEST_TIMEOUT:-300}" "$PYTHON" -m pytest -q tests -p no:cacheprovider -rs $PYTEST_ARGS

# What the tests do not check: CUDA against CPU on tensors of many chunks, the
# reductions bit-identical run to run, no host synchronisation, and the
# forward+backward time of a 128x64x56x56 float32 activation against y = x * 1.
step selfcheck 300 "$PYTHON" - "$OUT/selfcheck.json" <<'EOF'
import json
import sys

import torch

import dsq_ext

dev = "cuda"
torch.manual_seed(0)


def fwd_bwd(x, lower, upper, alpha, g, mode):
    leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper, alpha)]
    if mode == "dsq":
        y = dsq_ext.dsq_quantize(*leaves, 4)
    else:
        leaves = leaves[:3]
        y = dsq_ext.uniform_quantize(*leaves, 4)
    return [y.detach(), *torch.autograd.grad(y, leaves, g)]


for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for per_channel in (False, True):
        for mode in ("dsq", "uniform"):
            x = (1.5 * torch.randn(6, 3, 97, 131, device=dev)).to(dtype)
            g = torch.randn_like(x)
            c = (6,) if per_channel else ()
            p = (-1 - 0.2 * torch.rand(c, device=dev), 1 + 0.2 * torch.rand(c, device=dev), torch.full(c, 0.2, device=dev))
            a = fwd_bwd(x, *p, g, mode)
            b = fwd_bwd(x, *p, g, mode)
            assert all(torch.equal(u, v) for u, v in zip(a, b)), "not bit-identical run to run"
            ref = fwd_bwd(*(t.cpu() for t in (x, *p, g)), mode)
            # y and dx relative to 1 + |value| (a 16-bit ulp may differ), the sums per unit of sum|g|
            elem_tol, sum_tol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6)}.get(dtype, (1e-2, 1e-6))
            scale = g.abs().double().sum().item()
            errs = []
            for i, (u, v) in enumerate(zip(a, ref)):
                u, v = u.cpu().double(), v.double()
                errs.append(((u - v).abs() / (1 + v.abs())).max().item() if i < 2 else (u - v).abs().max().item() / scale)
            ok = max(errs[:2]) <= elem_tol and max(errs[2:]) <= sum_tol
            name = f"{mode} {str(dtype)[6:]} {'per_channel' if per_channel else 'per_tensor'}"
            print(f"{name:30s} cuda vs cpu: y {errs[0]:.1e} dx {errs[1]:.1e} sums {max(errs[2:]):.1e} {'ok' if ok else 'MISMATCH'}")
            assert ok, name

# Inputs first: torch.tensor(v, device="cuda") itself is a synchronous copy.
x = torch.randn(4, 64, 28, 28, device=dev)
p = (torch.full((), -1.0, device=dev), torch.ones(4, device=dev), torch.full((), 0.2, device=dev))
g = torch.ones_like(x)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
fwd_bwd(x, *p, g, "dsq")
fwd_bwd(x, *p, g, "uniform")
torch.cuda.set_sync_debug_mode("default")
print("forward + backward ran without a host synchronisation")

# bf16 computes in float32 registers, never in a float32 copy: beyond its inputs, a
# forward+backward allocates y and dx (2 bytes per element each) and the small
# per-chunk partial sums; a float32 copy of x would add at least 4 bytes per element.
xb = torch.randn(128, 64, 56, 56, device=dev).to(torch.bfloat16).requires_grad_()
gb = torch.randn_like(xb)
pb = [torch.tensor(v, device=dev, requires_grad=True) for v in (-1.0, 1.0, 0.2)]
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
torch.autograd.grad(dsq_ext.dsq_quantize(xb, *pb, 4), [xb, *pb], gb)
extra = (torch.cuda.max_memory_allocated() - base) / xb.nbytes
print(f"bf16 forward+backward peak allocation beyond its inputs: {extra:.3f}x the input (y + dx = 2)")
assert extra < 2.1, extra
del xb, gb


def median_ms(fn, reps=25):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


# torch.autograd.grad, not backward: accumulating into x.grad would add a pass to every case.
x = torch.randn(128, 64, 56, 56, device=dev, requires_grad=True)
g = torch.randn_like(x)
pt = [torch.tensor(v, device=dev, requires_grad=True) for v in (-1.0, 1.0, 0.2)]
pc = [torch.full((128,), v, device=dev, requires_grad=True) for v in (-1.0, 1.0, 0.2)]
cases = {
    "copy": (4, lambda: torch.autograd.grad(x * 1, [x], g)),
    "dsq_per_tensor": (5, lambda: torch.autograd.grad(dsq_ext.dsq_quantize(x, *pt, 4), [x, *pt], g)),
    "uniform_per_tensor": (5, lambda: torch.autograd.grad(dsq_ext.uniform_quantize(x, *pt[:2], 4), [x, *pt[:2]], g)),
    "dsq_per_channel": (5, lambda: torch.autograd.grad(dsq_ext.dsq_quantize(x, *pc, 4), [x, *pc], g)),
}
ms = {k: median_ms(fn) for k, (_, fn) in cases.items()}
for k, (passes, _) in cases.items():
    gbs = passes * x.numel() * 4 / ms[k] / 1e6
    print(f"fwd+bwd 128x64x56x56 float32 {k:20s} {ms[k]:7.3f} ms {ms[k] / ms['copy']:5.2f}x copy {gbs:6.0f} GB/s ({passes} passes)")
report = {
    "gpu": torch.cuda.get_device_name(0),
    "fwd_bwd_ms": ms,
    "ratio_to_copy": {k: t / ms["copy"] for k, t in ms.items()},
}
with open(sys.argv[1], "w") as f:
    json.dump(report, f, indent=1)
EOF

# The issue's activation (128x64x56x56) and a weight; torch.compile (a fresh compile
# per configuration) only where the comparison matters most, to keep the pass short.
step bench_ops "${BENCH_TIMEOUT:-240}" "$PYTHON" bench/bench_ops.py --device cuda --no-compile \
    --sizes 128x64x56x56,weight --dtypes float32,bfloat16,float16 --json "$OUT/bench_ops.json"
step bench_step "${BENCH_TIMEOUT:-240}" "$PYTHON" bench/bench_step.py --device cuda --profile float,dsq \
    --json "$OUT/bench_step.json"
step bench_compiled "${BENCH_TIMEOUT:-240}" "$PYTHON" bench/bench_ops.py --device cuda --compile \
    --sizes 128x64x56x56 --dtypes float32 --granularity per_tensor \
    --candidates copy,dsq,composite,composite_compiled --json "$OUT/bench_compiled.json"

echo "=== summary ($OUT)"
cat "$SUMMARY"
exit $FAILED
