"""Spiking attention modules, forward and forward+backward: spikecore.attention vs spikingjelly 2.0.

    python benchmarks/attention.py [--device cpu|cuda] [--quick]

Each module runs in training mode (BatchNorm batch statistics) on a binary spike input ``[T, B, C, N]``
(tokens last; spikingjelly's SpikeDrivenSelfAttention takes ``[T, B, C, H, W]``, the same tensor viewed
with N = H*W), ``dim = C``, 8 heads. ``fwd+bwd`` is one forward and ``out.backward(g)`` with a random
``g``, gradients to the input and every parameter. spikingjelly's layers (default LIFNode neurons) are
reset with ``functional.reset_net`` before every call; ours are stateless by default. spikingjelly's
SpikingSelfAttention computes ``(V K^T) Q``, i.e. the linear order, and is the reference for both SSA rows.
``ours/sj`` is our time over theirs (below 1: ours is faster).

On CUDA the SDSA module's attention core is the fused Triton kernel (K*V reduction, attention LIF and Q*KV
in one launch); an extra row, "SDSA unfused (PyTorch core)", runs the same module with the PyTorch core on
top of the fused LIF, so the two rows say what the fusion is worth.
"""

import argparse
import functools

import torch
from _common import add_common_args, apply_threads, cuda_peak_bytes, save, sync, time_many

LEGEND = (
    "ours = spikecore.attention module, sj = spikingjelly.activation_based.layer.attention equivalent; "
    "fwd under no_grad, fwd+bwd = forward + backward to input and parameters (training mode); "
    "ours/sj = time ratio (below 1: ours faster); peak = CUDA peak MiB of one fwd+bwd."
)


def modules(dim: int, heads: int, backend: str) -> list[tuple[str, torch.nn.Module, str | None]]:
    """(name, our module, name of spikingjelly's equivalent or None)."""
    from spikecore import attention as A

    kw = {"backend": backend}
    return [
        ("SSA qk_first", A.SpikingSelfAttention(dim, heads, order="qk_first", **kw), "SpikingSelfAttention"),
        ("SSA kv_first", A.SpikingSelfAttention(dim, heads, order="kv_first", **kw), "SpikingSelfAttention"),
        ("SDSA", A.SpikeDrivenSelfAttention(dim, heads, **kw), "SpikeDrivenSelfAttention"),
        ("QKTA", A.TokenQKAttention(dim, heads, **kw), "TokenQKAttention"),
        ("QKCA", A.ChannelQKAttention(dim, heads, **kw), "ChannelQKAttention"),
        ("FF-LiDiff", A.FFLiDiffAttention(dim, heads, **kw), None),
        ("FB-LiDiff (with feedback)", A.FBLiDiffAttention(dim, heads, **kw), None),
    ]


def unfused_sdsa(dim: int, heads: int, backend: str) -> torch.nn.Module:
    """SDSA with the PyTorch attention core (the fused Triton core switched off)."""
    from spikecore import attention as A

    class UnfusedSDSA(A.SpikeDrivenSelfAttention):
        def fused_core(self, q):
            return False

    return UnfusedSDSA(dim, heads, backend=backend)


def sj_module(name: str, dim: int, heads: int) -> torch.nn.Module:
    from spikingjelly.activation_based.layer import attention as SA

    return getattr(SA, name)(dim, heads)


def measure(calls: dict, x, g, device: str) -> dict:
    """``calls``: ``{name: (call(x) -> output, module)}``; returns ``{"<name>_<pass>_ms": ...}``."""

    def fwd(call, _m):
        with torch.no_grad():
            call(x)

    def fwd_bwd(call, m):
        x.grad = None
        m.zero_grad(set_to_none=True)
        call(x).backward(g)

    out = {}
    for p, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        times = time_many({k: functools.partial(step, *cm) for k, cm in calls.items()}, device)
        out.update({f"{k}_{p}_ms": ms for k, ms in times.items()})
    if device == "cuda":
        for k, (call, m) in calls.items():
            if out[f"{k}_fwd+bwd_ms"] is not None:
                x.grad = None  # so that the baseline holds only the inputs and parameters
                m.zero_grad(set_to_none=True)
                out[f"{k}_peak_MiB"] = cuda_peak_bytes(lambda c=call, m=m: fwd_bwd(c, m)) / 2**20
        sync(device)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--ours-backend", default="auto", help="LIF backend of our modules (default auto)")
    args = ap.parse_args(argv)
    apply_threads(args)
    dev = args.device
    from spikingjelly.activation_based import functional as sjf

    torch.manual_seed(0)
    if args.quick:
        T, B, C, H, W, heads = 2, 2, 64, 4, 4, 8
    elif dev == "cpu":
        T, B, C, H, W, heads = 4, 8, 384, 8, 8, 8  # Spikformer-4-384 on CIFAR: 64 tokens
    else:
        T, B, C, H, W, heads = 4, 32, 512, 14, 14, 8  # Spikformer-8-512 / QKFormer stage 3 on ImageNet
    N = H * W
    print(f"attention T={T} B={B} C={C} N={N} heads={heads} on {dev}", flush=True)
    x = (torch.rand(T, B, C, N, device=dev) < 0.2).float().requires_grad_()
    feedback = (torch.rand(T, B, C, N, device=dev) < 0.2).float()
    rows = []
    cases = modules(C, heads, args.ours_backend)
    if dev == "cuda":
        cases.insert(
            3,
            (
                "SDSA unfused (PyTorch core)",
                unfused_sdsa(C, heads, args.ours_backend),
                "SpikeDrivenSelfAttention",
            ),
        )
    for name, ours, sj_name in cases:
        ours = ours.to(dev).train()
        extra = {"feedback": feedback} if name.startswith("FB") else {}
        g = torch.randn(T, B, C, N, device=dev)
        row = {"module": name, "T": T, "B": B, "C": C, "N": N}
        calls = {"ours": (lambda x, m=ours, e=extra: m(x, **e), ours)}
        if sj_name is not None:
            sj = sj_module(sj_name, C, heads).to(dev).train()
            five_d = sj_name == "SpikeDrivenSelfAttention"

            def call(x, m=sj, five_d=five_d):
                sjf.reset_net(m)
                y = m(x.view(T, B, C, H, W) if five_d else x)
                return y.flatten(3) if five_d else y

            calls["sj"] = (call, sj)
            row["sj"] = sj_name
        r = measure(calls, x, g, dev)
        row.update({k: v for k, v in r.items() if k.startswith("ours")})
        row.update({k: v for k, v in r.items() if k.startswith("sj")})
        for p in ("fwd", "fwd+bwd"):
            if row.get(f"ours_{p}_ms") and row.get(f"sj_{p}_ms"):
                row[f"ours/sj {p}"] = row[f"ours_{p}_ms"] / row[f"sj_{p}_ms"]
        print(
            f"  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)),
            flush=True,
        )
        rows.append(row)
    save("attention", dev, rows, write=not args.quick, legend=LEGEND)


if __name__ == "__main__":
    main()
