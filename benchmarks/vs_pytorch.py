"""Our train step against PyTorch's on the same machine, side by side, one model after another.

    pip install -e ".[torch]"                      # optional: PyTorch + torchvision
    python benchmarks/vs_pytorch.py                # the five default rows
    python benchmarks/vs_pytorch.py --models resnet18:128:32 mobilenet_v2:32:224 --steps 5
    python benchmarks/vs_pytorch.py --dtype bfloat16    # our step in bf16 compute
    python benchmarks/vs_pytorch.py --ops               # then the op-level table (benchmarks/ops.py)

Each row is `model:batch:resolution`, 10 classes, SGD Nesterov (momentum 0.9), float32, random
data in memory (no input pipeline). Ours is `benchmarks/train_step.py --no-pipeline` (the CPU
defaults of `scaling`, i.e. the convolution flag on); PyTorch's is the torchvision model of the
same name with `torch.set_num_threads(<all cores>)`, the faster of its default and
channels_last memory formats. Every measurement runs in its own process, ours then PyTorch's,
so the ratio is taken side by side on the machine at hand. Without torch the PyTorch columns
are left empty.

Columns: images/s each side and their ratio; XLA's FLOPs per step and the useful FLOPs per step
(our MAC count x 2 x 3 x batch: what the step must compute, where XLA may count more, e.g. a
grouped convolution expanded into a dense one); our useful GFLOP/s and its fraction of this
machine's matmul rate. Figures are printed, never asserted.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROWS = ("resnet50:32:224", "efficientnet_b0:32:224", "mobilenet_v2:32:224",
                "resnet18:128:32", "vit_b_16:8:224")


def torch_available(*modules: str) -> bool:
    """True when torch (and `modules`, e.g. 'torchvision') import; a broken install (e.g. a CUDA
    build missing its libraries) counts as absent."""
    try:
        for name in ("torch",) + modules:
            __import__(name)
        return True
    except Exception:
        return False


def torch_step(name: str, batch: int, res: int, steps: int, classes: int, channels_last: bool) -> float:
    """Images/s of a torchvision model's SGD train step (run in a child process)."""
    import torch
    import torchvision

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    kw = {"image_size": res} if name.startswith("vit_") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=classes, **kw).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, classes, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def run_json(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def ours(name, batch, res, steps, classes, dtype) -> dict:
    return run_json([sys.executable, os.path.join(HERE, "train_step.py"), "--model", name,
                     "--batch", str(batch), "--resolution", str(res), "--steps", str(steps),
                     "--num-classes", str(classes), "--dtype", dtype, "--no-pipeline", "--json"])


def theirs(name, batch, res, steps, classes) -> dict:
    best = {}
    for cl in (False, True):
        r = run_json([sys.executable, os.path.abspath(__file__), "--torch-child", name, str(batch),
                      str(res), str(steps), str(classes), str(int(cl))])
        if "images_per_s" in r and r["images_per_s"] > best.get("images_per_s", 0):
            best = dict(r, channels_last=cl)
        elif not best and "error" in r:
            best = r
    return best


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_ROWS), help="model:batch:resolution")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--ops", action="store_true", help="also print benchmarks/ops.py's table")
    p.add_argument("--json", action="store_true", help="one JSON object per row as well")
    p.add_argument("--torch-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_child:
        name, batch, res, steps, classes, cl = args.torch_child
        ips = torch_step(name, int(batch), int(res), int(steps), int(classes), cl == "1")
        print(json.dumps({"images_per_s": round(ips, 2)}))
        return
    have_torch = torch_available("torchvision")
    if not have_torch:
        print("PyTorch/torchvision not importable: PyTorch columns left empty "
              "(pip install -e '.[torch]').")
    header = ("model", "batch", "res", "ours img/s", "PyTorch img/s", "ratio", "XLA GFLOP/step",
              "useful GFLOP/step", "useful GFLOP/s", "of matmul")
    rows = []
    for spec in args.models:
        name, batch, res = spec.split(":")
        batch, res = int(batch), int(res)
        o = ours(name, batch, res, args.steps, args.num_classes, args.dtype)
        t = theirs(name, batch, res, args.steps, args.num_classes) if have_torch else {}
        ratio = (o["images_per_s"] / t["images_per_s"]
                 if "images_per_s" in o and t.get("images_per_s") else None)
        row = dict(model=name, batch=batch, res=res, ours=o, pytorch=t, ratio=ratio)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        for side, r in (("ours", o), ("PyTorch", t)):
            if "error" in r:
                print(f"{name}: {side} failed: {r['error']}", flush=True)
    print(f"\n{args.dtype}, {args.steps} timed steps, matmul "
          f"{rows[0]['ours'].get('matmul_gflops', '?') if rows else '?'} GFLOP/s\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        o, t = r["ours"], r["pytorch"]
        cells = (r["model"], r["batch"], r["res"], fmt(o.get("images_per_s"), ".1f"),
                 fmt(t.get("images_per_s"), ".1f") + (" (cl)" if t.get("channels_last") else ""),
                 fmt(r["ratio"], ".2f"), fmt(o.get("step_gflop"), ".1f"),
                 fmt(o.get("useful_gflop"), ".1f"), fmt(o.get("useful_gflops"), ".1f"),
                 fmt(o.get("useful_fraction_of_matmul"), ".2f"))
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    if args.ops:
        print()
        subprocess.run([sys.executable, os.path.join(HERE, "ops.py")], check=False)


if __name__ == "__main__":
    main()
