"""Forward + backward time of the CUDA kernels against torch.nn.functional.cross_entropy
(eager and torch.compile) and against the memory floor.

The floor is 3 * N * C * bytes / B: the forward reads the logits once, the
backward reads them again and writes the gradient, and B is the measured
device-to-device copy bandwidth (bytes read plus bytes written per second).

    python benchmarks/bench_cuda.py [--quick] [--no-compile] [--json results.json] [--check]

"fused" runs the two bindings on preallocated buffers (workspace included), timed between CUDA
events over calls issued back to back; "graph" replays the same two calls captured in a CUDA
graph, which takes the host's per-call overhead out (it exceeds the kernels' time for small
shapes such as 8x262144); "torch op" is fused_xent.torch's autograd op (forward + backward).
--check exits with status 1 when the better of fused and graph misses its target fraction of
the floor (TARGETS: 85% for the large shapes, 50% for 8x262144, float32 and bfloat16).

Needs PyTorch with CUDA and a build of fused_xent with CUDA (no TensorFlow).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from fused_xent import _core

SHAPES = [(4096, 32000), (8192, 32000), (4096, 128256), (32768, 1024), (65536, 8), (8, 262144)]
QUICK_SHAPES = [(8192, 32000), (4096, 128256), (8, 262144)]
TARGETS = {(8192, 32000): 0.85, (4096, 128256): 0.85, (8, 262144): 0.50}
COMPILED_SHAPES = {(4096, 32000)}  # torch.compile takes tens of seconds per shape and dtype
DTYPES = ["bfloat16", "float32"]


def time_ms(fn, iters, warmup=3, calls=5):
    """Median over `iters` samples of the time per call of fn(), in milliseconds. Each
    sample times `calls` calls back to back between CUDA events, so the host's
    per-call overhead overlaps the device work as in a training loop."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes per second, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() / (ms * 1e-3)


def fused_step(logits, labels, loss, lse, grad_loss, grad):
    """The fused forward and backward on preallocated buffers, as an op library would run them."""
    name = str(logits.dtype).replace("torch.", "")
    rows, classes = logits.shape
    as_bits = (lambda t: t.view(torch.int16)) if logits.dtype == torch.bfloat16 else (lambda t: t)
    common = dict(
        dtype=name,
        logits=as_bits(logits),
        labels=labels,
        outer=rows,
        classes=classes,
        inner=1,
        label_smoothing=0.0,
        z_loss=0.0,
        ignore_index=None,
        class_weights=None,
    )

    size = _core.workspace_bytes("sparse_forward", rows, classes, 1, logits.element_size())
    workspace = torch.empty(size, dtype=torch.uint8, device=logits.device) if size else None

    def step():
        _core.cuda_sparse_forward(
            loss=as_bits(loss), lse=lse, stream=torch.cuda.current_stream().cuda_stream, workspace=workspace, **common
        )
        _core.cuda_sparse_backward(
            lse=lse,
            grad_loss=as_bits(grad_loss),
            grad_logits=as_bits(grad),
            stream=torch.cuda.current_stream().cuda_stream,
            **common,
        )

    return step


def graph_ms(step, iters, replays=20):
    """Time per step of `replays` copies of step() captured in one CUDA graph; None if capture fails."""
    try:
        step()  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(replays):
                step()
        return time_ms(graph.replay, iters) / replays
    except Exception as error:  # noqa: BLE001  (report, do not fail the benchmark)
        print(f"  (CUDA graph capture failed: {type(error).__name__}: {error})", file=sys.stderr)
        return None


def torch_op_step(logits, labels, grad_loss):
    import fused_xent.torch as ft

    x = logits.detach().requires_grad_(True)

    def step():
        loss = ft.sparse_softmax_cross_entropy_with_logits(labels, x)
        (g,) = torch.autograd.grad(loss, x, grad_loss)
        return g

    return step


def torch_step(fn, logits, labels, grad_loss):
    x = logits.detach().requires_grad_(True)

    def step():
        loss = fn(x, labels)
        (g,) = torch.autograd.grad(loss, x, grad_loss)
        return g

    return step


def eager_loss(x, y):
    return F.cross_entropy(x, y, reduction="none")


def run(shapes, dtypes, compile_shapes, iters):
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    header = (
        f"{'dtype':>9} {'N':>6} {'C':>7} {'floor ms':>9} {'fused ms':>9} {'graph ms':>9} {'of floor':>8} "
        f"{'torch op ms':>11} {'eager ms':>9} {'compiled ms':>11}"
    )
    print(header)
    compiled_loss = torch.compile(eager_loss, dynamic=False)
    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for rows, classes in shapes:
            torch.manual_seed(0)
            logits = (torch.randn(rows, classes, device="cuda") * 3).to(dtype)
            labels = torch.randint(0, classes, (rows,), device="cuda")
            grad_loss = torch.ones(rows, dtype=dtype, device="cuda")
            loss, grad = torch.empty(rows, dtype=dtype, device="cuda"), torch.empty_like(logits)
            lse = torch.empty(rows, dtype=torch.float64, device="cuda")
            floor_ms = 3 * logits.numel() * logits.element_size() / bandwidth * 1e3
            step = fused_step(logits, labels, loss, lse, grad_loss, grad)
            fused_ms = time_ms(step, iters)
            graphed_ms = graph_ms(step, iters)
            best_ms = min(fused_ms, graphed_ms or fused_ms)
            op_ms = time_ms(torch_op_step(logits, labels, grad_loss), iters)
            eager_ms = time_ms(torch_step(eager_loss, logits, labels, grad_loss), iters)
            compiled_ms = None
            if (rows, classes) in compile_shapes:
                t0 = time.perf_counter()
                compiled_ms = time_ms(torch_step(compiled_loss, logits, labels, grad_loss), iters)
                print(f"  (torch.compile took {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            row = dict(
                dtype=dtype_name,
                N=rows,
                C=classes,
                floor_ms=floor_ms,
                fused_ms=fused_ms,
                graph_ms=graphed_ms,
                fraction_of_floor=floor_ms / best_ms,
                torch_op_ms=op_ms,
                torch_op_fraction_of_floor=floor_ms / op_ms,
                eager_ms=eager_ms,
                compiled_ms=compiled_ms,
            )
            results.append(row)
            compiled = f"{compiled_ms:11.3f}" if compiled_ms is not None else f"{'-':>11}"
            graphed = f"{graphed_ms:9.3f}" if graphed_ms is not None else f"{'-':>9}"
            print(
                f"{dtype_name:>9} {rows:>6} {classes:>7} {floor_ms:9.3f} {fused_ms:9.3f} {graphed} "
                f"{floor_ms / best_ms:8.0%} {op_ms:11.3f} {eager_ms:9.3f} {compiled}",
                flush=True,
            )
            del logits, grad
            torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, results=results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a shape misses its target (TARGETS)")
    args = parser.parse_args()
    if not _core.build_info()["cuda"] or not torch.cuda.is_available():
        print("bench_cuda: needs a CUDA build of fused_xent and PyTorch with a GPU; skipped")
        return
    shapes = QUICK_SHAPES if args.quick else SHAPES
    report = run(shapes, DTYPES, set() if args.no_compile else COMPILED_SHAPES, args.iters)
    missed = [
        f"{r['dtype']} {r['N']}x{r['C']}: {r['fraction_of_floor']:.0%} of the floor "
        f"(target >= {TARGETS[(r['N'], r['C'])]:.0%})"
        for r in report["results"]
        if (r["N"], r["C"]) in TARGETS and r["fraction_of_floor"] < TARGETS[(r["N"], r["C"])]
    ]
    report["missed"] = missed
    for line in missed:
        print("MISSED: " + line)
    print(
        "RESULT " + json.dumps(dict(copy_bandwidth=report["copy_bandwidth"], missed=missed, results=report["results"]))
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.check and missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
