"""FlashAttention-4's dQ on Hopper at head dim 72: each fix of kernels/fa4_sm90.py (and none) for
correctness and speed, and the SM90 backward's tile configs at the padded head dims (issue 22).

    python -P benchmarks/fa4_dq_fix.py --out DIR [--modes off postprocess16 kernel32] [--sweep MODE]
    python -P benchmarks/fa4_dq_fix.py --table DIR/fa4_dq_fix.json   (or a child's JSON lines)

Each mode runs in its own process (a fix patches flash_attn.cute for the process), with
MUGV_FA4_DQ_FIX set:
1. Correctness, the rule of parity_tests/kernels/test_attention_fa4.py: error against a float64
   reference of the output and dQ, dK, dV at most 2x plain torch's bf16 error plus a floor of 4 bf16
   ulps of the reference's scale; the `ratio` printed is error / that bound (pass <= 1). Self-attention
   (2 x 1,000 tokens, 4 heads) and varlen cross-attention (777 queries, 300 keys, one row with 123
   real), for the model's head dim 72 run at 72 and 80, and (released FA4) 96 (zero-padded: exact).
2. Speed at the 10B model's 720p shape: self-attention, 1 x 50,400 tokens x 48 heads, bf16, forward
   and forward+backward (median of 5 after a compile call), useful TFLOP/s counting the FLOPs at head
   dim 72 as benchmarks/dit_step.py does (forward 4 L^2 h d, backward 2x forward).
3. `--sweep MODE`: in that mode, the SM90 backward at head dim 80 with other tile configs
   (`interface._tile_size_bwd_sm90` replaced for this process only), each checked for correctness
   as in 1 (self-attention) and timed as in 2.
4. `--sweep-fwd MODE`: the same for the SM90 forward's tile configs at head dim 80
   (`interface._tile_size_fwd_sm90`; `FWD_SWEEP`). The backward reads the forward's output and
   log-sum-exp, so each config is checked on dQ, dK, dV too.
Prints a table last and writes DIR/fa4_dq_fix.json. Needs an SM90 GPU with flash-attn-4.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

# where each fix is checked: 96 is a multiple of 32, where the fixes change nothing (released FA4
# passes there: the production padding before the fix); 72 and 80 are where dQ was wrong
CHECK_AT = {"off": (96, 72, 80), "postprocess16": (72, 80), "kernel32": (72, 80)}
SWEEP_AT = 80
MODEL_D = 72


def _rel_errors(kind: str, d: int, run_at: int, seed: int) -> dict:
    """{out, dq, dk, dv: error / bound} of FA4 at `run_at` for model head dim `d` (test_attention_fa4's rule)."""
    import torch
    import torch.nn.functional as F

    from mugv.torch_backend.models.attention import DotProductAttention, fa4_attention
    g = torch.Generator().manual_seed(seed)
    b, n = 2, 4
    sq, sk = (1000, 1000) if kind == "self" else (777, 300)
    q, k, v = (torch.randn(s, b, n, d, generator=g, dtype=torch.float64).cuda() for s in (sq, sk, sk))
    up = torch.randn(sq, b, n * d, generator=g, dtype=torch.float64).cuda()
    mask = None
    if kind == "cross":
        mask = (torch.arange(sk)[None, :] < torch.tensor([sk, 123])[:, None]).cuda()

    def fa4(q, k, v):
        q, k, v = (F.pad(t.transpose(0, 1), (0, run_at - d)).contiguous() for t in (q, k, v))
        return fa4_attention(q, k, v, mask, scale=d ** -0.5)[..., :d].transpose(0, 1).flatten(2)

    def run(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        out.backward(up.to(dtype))
        return [out.detach().double()] + [x.grad.double() for x in xs]

    math = DotProductAttention("math")
    ref = run(lambda q, k, v: math(q, k, v, mask), torch.float64)
    base = run(lambda q, k, v: math(q, k, v, mask), torch.bfloat16)
    got = run(fa4, torch.bfloat16)
    ratios = {}
    for name, gt, bt, rt in zip(("out", "dq", "dk", "dv"), got, base, ref):
        scale = float(rt.abs().max())
        err_k, err_t = float((gt - rt).abs().max()), float((bt - rt).abs().max())
        ratios[name] = round(err_k / (2 * err_t + 4 * 2 ** -8 * scale), 4)
    return ratios


def _time(run_at: int, tokens: int, heads: int, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    from mugv.torch_backend.models.attention import fa4_attention
    from mugv.torch_backend.parallel.profiling import call_ms
    base = [torch.randn(1, tokens, heads, MODEL_D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    qkv = [F.pad(t, (0, run_at - MODEL_D)).contiguous().requires_grad_() for t in base]
    flops_fwd = 4 * tokens * tokens * heads * MODEL_D
    out = {}
    for what in ("fwd", "fwd+bwd"):
        def call():
            o = fa4_attention(*qkv, scale=MODEL_D ** -0.5)
            if what == "fwd+bwd":
                o.backward(torch.ones_like(o))
        times = call_ms(call, iters, warmup=1, device="cuda")  # the first call compiles
        ms = statistics.median(times)
        flops = flops_fwd * (3 if what == "fwd+bwd" else 1)
        out[what] = {"ms": round(ms, 2), "useful_tflops": round(flops / ms / 1e9, 1)}
    return out


def _check_and_time(label: str, run_at: int, args, kinds=("self", "cross")) -> dict:
    row = {"label": label, "run_at": run_at}
    try:
        t0 = time.time()
        ratios = {kind: _rel_errors(kind, MODEL_D, run_at, seed=run_at) for kind in kinds}
        row["ratios"] = ratios
        row["worst_ratio"] = max(r for kind in ratios.values() for r in kind.values())
        row["passes"] = row["worst_ratio"] <= 1.0
        row.update(_time(run_at, args.tokens, args.heads, args.iters))
        row["seconds"] = round(time.time() - t0, 1)
    except Exception as err:  # noqa: BLE001 - a config the kernel refuses is a result too
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    print(json.dumps(row), flush=True)
    return row


# SM90 backward tile configs tried at head dims 65..96 (the released one first): fields of
# flash_attn.cute.interface.BwdConfig. Sources of the others: the released configs of the
# neighbouring head-dim ranges (<= 64 and <= 128) and the released one without its single-warpgroup dQ.
SWEEP = {
    "released (64x128, dQ single WG)": None,
    "64x128, dQ on both WGs": dict(m_block_size=64, n_block_size=128, num_stages_Q=2, num_stages_dO=2,
                                   num_stages_PdS=2, SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False,
                                   AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1),
    "128x128 (the <= 64 config)": dict(m_block_size=128, n_block_size=128, num_stages_Q=2, num_stages_dO=2,
                                       num_stages_PdS=2, SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False,
                                       AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=2),
    "80x128 dQ swapped (the <= 128 config)": dict(m_block_size=80, n_block_size=128, num_stages_Q=2,
                                                  num_stages_dO=2, num_stages_PdS=2, SdP_swapAB=True,
                                                  dKV_swapAB=False, dQ_swapAB=True, AtomLayoutMSdP=1,
                                                  AtomLayoutNdKV=2, AtomLayoutMdQ=1),
    "64x128, 1-stage PdS": dict(m_block_size=64, n_block_size=128, num_stages_Q=2, num_stages_dO=2,
                                num_stages_PdS=1, SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False,
                                AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1, dQ_single_wg=True),
    # session 10: wider key tiles (fewer dQ atomic adds per key; a head dim of 80 leaves the
    # registers and shared memory that 96 and 128 need) and one-stage pipelines
    **{f"64x{n}, 1-stage PdS": dict(m_block_size=64, n_block_size=n, num_stages_Q=2, num_stages_dO=2,
                                    num_stages_PdS=1, SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False,
                                    AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1, dQ_single_wg=True)
       for n in (144, 160, 192)},
    "64x128, 1-stage PdS and dO": dict(m_block_size=64, n_block_size=128, num_stages_Q=2, num_stages_dO=1,
                                       num_stages_PdS=1, SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False,
                                       AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1, dQ_single_wg=True),
    "128x128, 1-stage PdS": dict(m_block_size=128, n_block_size=128, num_stages_Q=2, num_stages_dO=2,
                                 num_stages_PdS=1, SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False,
                                 AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=2),
    "96x128, 1-stage PdS": dict(m_block_size=96, n_block_size=128, num_stages_Q=2, num_stages_dO=2,
                                num_stages_PdS=1, SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False,
                                AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1, dQ_single_wg=True),
}


# SM90 forward configs tried at head dims 65..96 (session 12): fields of interface.FwdConfig
# (tile_m, tile_n, P.V with P in registers, intra-warpgroup overlap). The released one is
# 192x144 without RS (its comment: RS is "catastrophic" at 192-row tiles); the C++ FA3 takes 144
# for head dims up to 96. At 80 the S accumulator of a wider key tile still fits the registers
# that 96 needs for O, so wider key tiles are candidates, and the <= 128 family's 128-row RS tiles.
FWD_SWEEP = {
    "released (192x144, no RS, overlap)": None,
    **{f"192x{n}, no RS, overlap": (192, n, False, True) for n in (112, 128, 160, 176)},
    "192x144, no RS, no overlap": (192, 144, False, False),
    **{f"128x{n}, RS, overlap": (128, n, True, True) for n in (128, 176, 192)},
    "128x176, no RS, overlap": (128, 176, False, True),
}


def child(args) -> None:
    from mugv.torch_backend.models.attention import fa4_version
    version = fa4_version()   # applies this process's fix
    print(json.dumps({"mode": os.environ.get("MUGV_FA4_DQ_FIX"), "version": version}), flush=True)
    if not (args.sweep_child or args.sweep_fwd_child):
        for p in CHECK_AT[args.child]:
            _check_and_time(f"{args.child}", p, args)
        return
    from flash_attn.cute import interface
    if args.sweep_fwd_child:
        released_fwd = interface._tile_size_fwd_sm90
        for name, cfg in FWD_SWEEP.items():
            def fwd_tile(head_dim, head_dim_v, is_causal, is_local, sparse_block_size_q=None, _cfg=cfg):
                if _cfg is not None and 64 < head_dim <= 96 and not (is_causal or is_local):
                    return interface.FwdConfig(*_cfg)
                return released_fwd(head_dim, head_dim_v, is_causal, is_local, sparse_block_size_q)
            interface._tile_size_fwd_sm90 = fwd_tile   # tile_m/n, RS and overlap are compile keys
            _check_and_time(f"{args.child} | fwd {name}", SWEEP_AT, args, kinds=("self",))
        return
    released = interface._tile_size_bwd_sm90
    for name, cfg in SWEEP.items():
        def tile(head_dim, head_dim_v, causal, local, sparse_block_size_q=None, _cfg=cfg):
            if _cfg is not None and 64 < head_dim <= 96:
                return interface.BwdConfig(**_cfg)
            return released(head_dim, head_dim_v, causal, local, sparse_block_size_q)
        interface._tile_size_bwd_sm90 = tile   # the configs are part of the kernels' compile keys
        _check_and_time(f"{args.child} | {name}", SWEEP_AT, args, kinds=("self",))


def print_table(rows: list[dict]) -> None:
    print("| fix (mode, config) | runs at | worst error / bound (self, cross; pass <= 1) | fwd ms | "
          "fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label'].replace(' | ', ' / ')} | {r.get('run_at', '')} | error: {r['error'][:120]} | | | | |")
            continue
        dq = ", ".join(f"dQ {k} {v['dq']:.3f}" for k, v in r["ratios"].items())
        print(f"| {r['label'].replace(' | ', ' / ')} | {r['run_at']} | {r['worst_ratio']:.3f} ({dq}) "
              f"{'pass' if r['passes'] else 'FAIL'} | {r['fwd']['ms']} | "
              f"{r['fwd']['useful_tflops']} | {r['fwd+bwd']['ms']} | {r['fwd+bwd']['useful_tflops']} |")


def table_of(path: pathlib.Path) -> int:
    """--table: the table of a finished run, from its fa4_dq_fix.json or a child's JSON lines."""
    text = path.read_text()
    if path.suffix == ".json":
        rows = json.loads(text)["rows"]
    else:
        rows = [r for r in map(json.loads, filter(str.strip, text.splitlines())) if "label" in r]
    print_table(rows)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--modes", nargs="*", default=["off", "postprocess16", "kernel32"])
    ap.add_argument("--sweep", default="", help="a mode to sweep the SM90 backward's tile configs in")
    ap.add_argument("--sweep-fwd", default="", help="a mode to sweep the SM90 forward's tile configs in")
    ap.add_argument("--table", default="", help="print the table of a finished run's .json / .jsonl")
    ap.add_argument("--tokens", type=int, default=50400)
    ap.add_argument("--heads", type=int, default=48)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--child-timeout", type=int, default=150, help="seconds per mode's process")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sweep-fwd-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        return table_of(pathlib.Path(args.table))
    if args.child:
        child(args)
        return 0
    import torch
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(m, None) for m in args.modes] + ([(args.sweep, "--sweep-child")] if args.sweep else []) \
        + ([(args.sweep_fwd, "--sweep-fwd-child")] if args.sweep_fwd else [])
    rows, meta = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "command": "python -P benchmarks/fa4_dq_fix.py " + " ".join(sys.argv[1:])}
    for mode, sweep in runs:
        cmd = [sys.executable, "-P", __file__, "--child", mode, "--tokens", str(args.tokens),
               "--heads", str(args.heads), "--iters", str(args.iters)] + ([sweep] if sweep else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout,
                                  env={**os.environ, "MUGV_FA4_DQ_FIX": mode})
            stdout, failed = proc.stdout, proc.returncode and proc.stderr[-600:]
        except subprocess.TimeoutExpired as err:
            stdout = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            failed = f"timed out after {args.child_timeout} s"
        for line in stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if "label" in rec:
                    rows.append(rec)
                else:
                    meta.setdefault("children", []).append(rec)
        if failed:
            rows.append({"label": mode + (f" {sweep}" if sweep else ""), "error": failed})
        (out / "fa4_dq_fix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['date']}; self-attention 1 x {args.tokens} "
          f"tokens x {args.heads} heads, head dim {MODEL_D} (useful TFLOP/s at {MODEL_D})")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
