"""Peak host memory of a streaming ``load_model(path, quantize="int4")`` (issue 25, bar 4).

Writes a random bf16 checkpoint of a Llama-4-shaped model (default ~1.4 GB: hidden 1024, 16
experts of width 2048, 6 layers, vocab 32768) into a temporary folder, one safetensors shard per
layer plus an index (as Hugging Face shards), tensor by tensor. Then a fresh Python process
imports torch and longctx, notes its RSS, loads the checkpoint with ``quantize="int4"`` and
reports:

* peak RSS (``ru_maxrss``): anonymous memory plus the checkpoint's file pages that safetensors'
  memory maps have touched and not unmapped (page cache: reclaimable, but counted);
* peak anonymous RSS (``RssAnon`` of /proc/self/status, sampled every 2 ms by a thread): the
  memory the load itself allocates;
* the bar: peak anonymous RSS - RSS before the load <= quantized state bytes + the largest
  tensor + a margin (the quantization temporaries of one expert and allocator slack; stated in
  the record).

The checkpoint is deleted afterwards.

    python benchmarks/quant_load_memory.py --record
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from longctx.checkpoint import longctx_to_hf
from longctx.config import ModelConfig
from longctx.model import Model
from records import write_record

RESULTS = Path(__file__).parent / "results"
MIB = 1 << 20

# Runs in the fresh process: argv[1] the checkpoint folder. Prints one JSON line.
CHILD = textwrap.dedent("""
    import json, resource, sys, threading, time
    import torch
    from longctx import load_model

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    peak_anon, done = [status("RssAnon")], threading.Event()
    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))
            time.sleep(0.002)

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = {"rss": status("VmRSS"), "anon": status("RssAnon"), "maxrss": maxrss}
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    model = load_model(sys.argv[1], quantize="int4")
    took = time.perf_counter() - t0
    done.set(); thread.join()
    peak_anon[0] = max(peak_anon[0], status("RssAnon"))
    seen = {}
    for t in model.state_dict().values():
        seen[id(t)] = t.numel() * t.element_size()
    print(json.dumps({"before": before, "peak_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_anon": peak_anon[0], "after_rss": status("VmRSS"), "after_anon": status("RssAnon"),
                      "quantized_bytes": sum(seen.values()), "load_s": took}))
""")


def config(layers: int) -> ModelConfig:
    base = ModelConfig.preset("scout")
    return ModelConfig(
        **{
            **base.__dict__,
            "vocab_size": 32768,
            "hidden_size": 1024,
            "num_hidden_layers": layers,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "intermediate_size": 2048,
            "moe_layers": None,
            "no_rope_layers": [],
        }
    )


def write_checkpoint(cfg: ModelConfig, folder: Path) -> tuple[int, int, int]:
    """Random bf16 weights of ``cfg`` in one shard per layer (+ one for the rest) and an index;
    tensors are made and written a shard at a time. Returns (total bytes, largest tensor bytes,
    largest shard bytes)."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Model(cfg).named_parameters()}
    shards: dict[str, list[str]] = {}
    for name in shapes:
        shard = name.split(".")[1] if name.startswith("layers.") else "rest"
        shards.setdefault(shard, []).append(name)
    g = torch.Generator().manual_seed(0)
    weight_map, total, largest, biggest_shard = {}, 0, 0, 0
    for i, names in enumerate(shards.values()):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in names:
            t = (
                torch.ones(shapes[n], dtype=torch.bfloat16)
                if n.endswith("norm.weight")
                else (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16)
            )
            tensors[longctx_to_hf(n)] = t
            weight_map[longctx_to_hf(n)] = fname
            largest = max(largest, t.numel() * 2)
        size = sum(t.numel() * 2 for t in tensors.values())
        total, biggest_shard = total + size, max(biggest_shard, size)
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    hf = cfg.to_hf()
    hf["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(hf))
    return total, largest, biggest_shard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument(
        "--margin-mib",
        type=int,
        default=160,
        help="allowance for one expert's quantization temporaries and allocator slack",
    )
    ap.add_argument("--dir", default=None, help="parent folder of the temporary checkpoint (default: the system's)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()

    cfg = config(args.layers)
    folder = Path(tempfile.mkdtemp(prefix="longctx_quant_load_", dir=args.dir))
    try:
        total, largest, shard = write_checkpoint(cfg, folder)
        print(
            f"checkpoint: {total / MIB:.0f} MiB bf16, largest tensor {largest / MIB:.0f} MiB, "
            f"largest shard {shard / MIB:.0f} MiB",
            flush=True,
        )
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    q, margin = r["quantized_bytes"], args.margin_mib * MIB
    grown_anon = r["peak_anon"] - r["before"]["anon"]
    grown_total = r["peak_maxrss"] - r["before"]["rss"]
    bound = q + largest + margin
    ok = grown_anon <= bound
    rows = [
        ("checkpoint (bf16, safetensors)", total),
        ("largest tensor", largest),
        ("largest shard", shard),
        ("quantized model (state_dict bytes)", q),
        ("margin", margin),
        ("bound: quantized + largest + margin", bound),
        ("RSS before the load (torch + longctx imported)", r["before"]["rss"]),
        ("peak anonymous RSS - anonymous RSS before", grown_anon),
        ("peak RSS (ru_maxrss) - RSS before", grown_total),
        ("anonymous RSS after - before", r["after_anon"] - r["before"]["anon"]),
    ]
    body = [
        "| quantity | MiB |",
        "|---|---|",
        *(f"| {k} | {v / MIB:,.1f} |" for k, v in rows),
        "",
        f"bar (peak anonymous growth <= bound): {'met' if ok else 'NOT met'} "
        f"({grown_anon / MIB:,.1f} <= {bound / MIB:,.1f} MiB); load took {r['load_s']:.1f} s",
    ]
    print("\n".join(body))
    if args.record:
        facts = [
            f"model: Llama-4-shaped, random bf16: hidden 1024, {args.layers} MoE layers (16 experts of width "
            "2048, top-1, shared expert), 8 heads / 2 KV heads x 128, vocab 32768; one shard per layer + index",
            "load: `load_model(path, quantize='int4')` (group 128, experts + shared expert int4, the rest bf16) "
            "in a fresh process; the checkpoint folder is deleted afterwards",
            "RSS also counts the checkpoint pages that safetensors' memory maps have touched (page cache: "
            "clean, reclaimable). The parameters kept unquantized (bf16 attention, norms, router, "
            "embeddings, head) are views into those maps, so every shard stays mapped, with the pages of "
            "the experts it held, until the model is freed: the total grows by about the whole checkpoint. "
            "The bar is on anonymous memory, sampled every 2 ms (a shorter peak could be missed)",
            f"margin {args.margin_mib} MiB: one expert matrix's quantization temporaries (its fp32 copy, "
            "the int8 values, the int64 packing fields: ~13 bytes a weight, ~52 MiB for a 4096 x 1024 "
            "gate_up) and allocator slack",
        ]
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        path = write_record(
            RESULTS,
            "quant_load_memory",
            "Streaming int4 load: peak host memory",
            command,
            facts,
            body,
            threads=torch.get_num_threads(),
        )
        print(f"recorded {path}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
