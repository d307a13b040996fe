"""``veil tune …``: secure split fine-tuning (server enclave, client, export)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import typer

from veil.atomic import atomic_write_text
from veil.cli.common import run_cli
from veil.errors import ConfigError, InputError

app = typer.Typer(
    name="tune",
    help="Secure split fine-tuning of LLMs: later layers + adapters in a server TEE.",
    no_args_is_help=True,
)

log = logging.getLogger("veil.tune")


def _adapter_options(
    adapter: str,
    lora_r: int,
    lora_alpha: int,
    virtual_tokens: int,
    spf_ratio: float = 0.01,
    spf_score: str = "l1",
) -> dict[str, Any]:
    if adapter == "lora":
        return {"r": lora_r, "alpha": lora_alpha}
    if adapter == "spf":
        return {"r": lora_r, "alpha": lora_alpha, "ratio": spf_ratio, "score": spf_score}
    if adapter == "ptuning":
        return {"num_virtual_tokens": virtual_tokens}
    raise ConfigError(f"unknown adapter {adapter!r}: choose lora, ptuning or spf")


def _model_id(model: str) -> str:
    """A stable id of the base model: name + SHA-256 of its files (measured into the enclave)."""
    import hashlib

    from veil.tune.data import model_files

    h = hashlib.sha256()
    for f in model_files(model):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return f"{Path(model).name if model != 'smollm2' else 'smollm2'}:{h.hexdigest()[:32]}"


def _identity_and_peer(identity: Path | None, peer: str | None) -> tuple[Any, dict[str, Any]]:
    from veil.comm.identity import PartyIdentity

    if identity is None or peer is None:
        raise ConfigError(
            "--identity DIR and --peer FINGERPRINT|CERT.pem are required (see `veil keys init`)"
        )
    ident = PartyIdentity.load(identity)
    p = Path(peer)
    return ident, ({"peer_cert": p} if p.is_file() else {"peer_fingerprint": peer})


def _simulated_banner(simulated: bool) -> None:
    if simulated:
        typer.secho(
            "WARNING: SIMULATED TEE — no hardware protection; for development and tests only.",
            fg=typer.colors.YELLOW,
            err=True,
        )


# ---------------------------------------------------------------------------- server


@app.command("server")
@run_cli
def server(
    model: str = typer.Option("smollm2", help="'smollm2' (packaged GGUF), a local HF dir or a .gguf file."),
    cut_layer: int = typer.Option(2, "--cut-layer", help="Layers 0..K-1 run at the client."),
    adapter: str = typer.Option("lora", help="lora | ptuning | spf (LoRA + sparse heads/FFN neurons)"),
    tee: str = typer.Option("simulated", help="TEE backend: simulated | gramine"),
    listen: str = typer.Option("127.0.0.1:50070", help="host:port to listen on."),
    identity: Path | None = typer.Option(None, help="This party's identity dir (veil keys init)."),
    peer: str | None = typer.Option(None, help="Client certificate fingerprint or cert file."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (measured into the enclave)."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha."),
    virtual_tokens: int = typer.Option(8, help="P-tuning v2 prefix length."),
    spf_ratio: float = typer.Option(0.01, help="SPF: fraction of FFN neurons and attention heads trained."),
    spf_score: str = typer.Option("l1", help="SPF importance: l1 | grad (first micro-batch)."),
    checkpoint: Path | None = typer.Option(None, help="Sealed checkpoint file (restored if present)."),
    checkpoint_every: int = typer.Option(
        10, help="Seal a checkpoint every N optimizer steps (0 = only at end)."
    ),
    owner_public_key: Path | None = typer.Option(
        None, help="Model owner's X25519 public key: export at end."
    ),
    export_out: Path | None = typer.Option(None, help="Where to write the encrypted export at the end."),
    merged: bool = typer.Option(False, help="Export merged weights instead of the adapter only."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the client / each message."),
) -> None:
    """Run the enclave server for one client session (untrusted host + enclave object)."""
    from veil.comm.grpc_channel import GrpcChannel
    from veil.tune.data import load_model_and_tokenizer
    from veil.tune.enclave_server import build_tune_enclave, read_checkpoint, serve_host, write_checkpoint
    from veil.tune.export import load_owner_public

    ident, peer_kw = _identity_and_peer(identity, peer)
    opts = _adapter_options(adapter, lora_r, lora_alpha, virtual_tokens, spf_ratio, spf_score)
    owner_pub = load_owner_public(owner_public_key) if owner_public_key else None
    if owner_pub is not None and export_out is None:
        raise ConfigError("--owner-public-key needs --export-out FILE")
    lm, _ = load_model_and_tokenizer(model)
    mid = _model_id(model)
    t = build_tune_enclave(
        lm,
        cut_layer=cut_layer,
        adapter=adapter,
        model_id=mid,
        lr=lr,
        adapter_options=opts,
        tee_backend=tee,
        checkpoint_every=checkpoint_every,
    )
    _simulated_banner(bool(t.enclave.simulated))
    typer.echo(
        f"enclave measurement: {t.enclave.measurement}  (backend {t.enclave.backend}"
        f"{', SIMULATED' if t.enclave.simulated else ''})"
    )
    if checkpoint is not None and (blob := read_checkpoint(checkpoint)) is not None:
        typer.echo(f"restored sealed checkpoint {checkpoint} at step {t.restore(blob)}")
    typer.echo(f"listening on {listen} …")
    ch = GrpcChannel.listen(listen, ident, timeout=timeout, **peer_kw)
    try:
        step = serve_host(ch, t, checkpoint_path=checkpoint, idle_timeout=timeout)
    finally:
        ch.close()
    typer.echo(f"session ended at step {step}")
    if owner_pub is not None and export_out is not None:
        write_checkpoint(export_out, t.export(owner_pub, merged=merged))
        typer.echo(f"wrote encrypted export ({'merged' if merged else 'adapter'}) to {export_out}")


# ---------------------------------------------------------------------------- client


@app.command("client")
@run_cli
def client(
    server_addr: str = typer.Option(..., "--server", help="host:port of `veil tune server`."),
    identity: Path | None = typer.Option(None, help="This party's identity dir."),
    peer: str | None = typer.Option(None, help="Server certificate fingerprint or cert file."),
    model: str = typer.Option("smollm2", help="Same base model as the server."),
    cut_layer: int = typer.Option(2, "--cut-layer"),
    adapter: str = typer.Option("lora"),
    data: str = typer.Option(
        "bbc", help="'bbc' (BBC News, packaged) or a JSONL file of {prompt, completion}."
    ),
    epochs: int = typer.Option(1),
    batch_size: int = typer.Option(4),
    grad_accum: int = typer.Option(1),
    max_steps: int | None = typer.Option(None),
    max_length: int = typer.Option(128, help="Tokens per example (BBC prompts are truncated to fit)."),
    seed: int = typer.Option(0),
    lr: float = typer.Option(1e-3, help="Must match the server (part of the expected measurement)."),
    lora_r: int = typer.Option(8),
    lora_alpha: int = typer.Option(16),
    virtual_tokens: int = typer.Option(8),
    spf_ratio: float = typer.Option(0.01),
    spf_score: str = typer.Option("l1"),
    measurement: str | None = typer.Option(None, help="Expected enclave measurement (default: computed)."),
    allow_simulated: bool = typer.Option(False, help="Accept a SIMULATED enclave (development only)."),
    eval_examples: int = typer.Option(100, help="BBC test examples for accuracy before/after (0 = skip)."),
    wire_dtype: str = typer.Option("float32", help="float32 | float16 activations on the wire."),
    plot: Path = typer.Option(Path("tune_loss.png"), help="Loss-curve PNG."),
    out: Path | None = typer.Option(None, help="Write the run summary JSON here."),
    timeout: float = typer.Option(600.0),
) -> None:
    """Fine-tune through an attested enclave server; shows loss, tokens/s and bytes sent."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from veil.comm.grpc_channel import GrpcChannel
    from veil.tee import Policy, Verifier
    from veil.tune.client import TuneClient, evaluate_classification, train_split
    from veil.tune.data import (
        bbc_examples,
        encode_examples,
        label_token_ids,
        load_jsonl,
        load_model_and_tokenizer,
    )
    from veil.tune.enclave_server import expected_measurement
    from veil.tune.split import client_part

    if data != "bbc" and not Path(data).is_file():
        raise InputError(f"data file {data} does not exist (use 'bbc' or a JSONL of prompt/completion)")
    ident, peer_kw = _identity_and_peer(identity, peer)
    opts = _adapter_options(adapter, lora_r, lora_alpha, virtual_tokens, spf_ratio, spf_score)
    lm, tok = load_model_and_tokenizer(model)
    ctx = int(getattr(lm.config, "max_position_embeddings", 0) or 0) or None
    test: list[Any] = []
    if data == "bbc":
        train_ex, test = bbc_examples(seed=seed)
    else:
        train_ex = load_jsonl(data)
    train_enc = encode_examples(
        tok, train_ex, max_length=max_length, context_length=ctx, truncate_prompt=data == "bbc"
    )
    test_enc = (
        encode_examples(tok, test[:eval_examples], max_length=max_length, context_length=ctx) if test else []
    )
    meas = measurement or expected_measurement(
        model_id=_model_id(model), cut_layer=cut_layer, adapter=adapter, lr=lr, adapter_options=opts
    )
    policy = Policy(
        allowed_measurements={meas},
        allow_simulated=allow_simulated,
        trust_any_simulated_platform=allow_simulated,
    )
    part = client_part(lm, cut_layer)
    del lm
    ch = GrpcChannel.connect(server_addr, ident, timeout=timeout, **peer_kw)
    c = TuneClient(ch, part, Verifier(policy), wire_dtype=wire_dtype, timeout=timeout)
    info = c.connect()
    _simulated_banner(info.simulated)
    labels = label_token_ids(tok)
    pad = int(tok.pad_token_id)
    summary: dict[str, Any] = {
        "simulated": info.simulated,
        "measurement": info.measurement,
        "cut_layer": cut_layer,
        "adapter": adapter,
        "start_step": info.step,
    }
    if test_enc and eval_examples > 0:
        summary["accuracy_before"] = evaluate_classification(c.score, test_enc, labels, pad_id=pad)
        typer.echo(f"test accuracy before: {summary['accuracy_before']:.3f}")
    t0 = time.perf_counter()
    tokens = 0
    with Progress(
        TextColumn("[bold]tune[/] step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s  {task.fields[mb]:.1f} MB sent"
        ),
        TimeRemainingColumn(),
    ) as prog:
        task = prog.add_task("tune", total=None, loss=float("nan"), tps=0.0, mb=0.0, completed=info.step)

        def on_step(rec: Any, n_steps: int) -> None:
            nonlocal tokens
            tokens += rec.tokens
            el = time.perf_counter() - t0
            prog.update(
                task,
                total=n_steps,
                completed=rec.step + 1,
                loss=rec.loss,
                tps=tokens / max(el, 1e-9),
                mb=c.bytes_sent / 1e6,
            )

        hist = train_split(
            c.train_micro,
            train_enc,
            pad_id=pad,
            batch_size=batch_size,
            grad_accum=grad_accum,
            epochs=epochs,
            seed=seed,
            max_steps=max_steps,
            start_step=info.step,
            bytes_sent=lambda: c.bytes_sent,
            on_step=on_step,
        )
    if test_enc and eval_examples > 0:
        summary["accuracy_after"] = evaluate_classification(c.score, test_enc, labels, pad_id=pad)
        typer.echo(f"test accuracy after:  {summary['accuracy_after']:.3f}")
    summary["final_step"] = c.finish()
    ch.close()
    summary.update(
        {
            "losses": hist.losses,
            "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received,
            "seconds": time.perf_counter() - t0,
        }
    )
    _plot_losses({f"split k={cut_layer} ({'simulated ' if info.simulated else ''}TEE)": hist.losses}, plot)
    typer.echo(f"loss curve: {plot}")
    if out is not None:
        atomic_write_text(out, json.dumps(summary, indent=2))


def _plot_losses(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- export & keys


@app.command("owner-keygen")
@run_cli
def owner_keygen(
    out: Path = typer.Option(..., help="Directory for the model owner's X25519 key pair."),
) -> None:
    """Create the model owner's export key pair (private key file is 0600)."""
    from veil.tune.export import OWNER_PUBLIC_FILE, generate_owner_keys

    pub = generate_owner_keys(out)
    typer.echo(f"owner public key {pub.hex()} written to {out / OWNER_PUBLIC_FILE}")


@app.command("export")
@run_cli
def export(
    checkpoint: Path = typer.Option(..., help="Sealed checkpoint written by `veil tune server`."),
    owner_public_key: Path = typer.Option(..., help="Model owner's public key file or directory."),
    out: Path = typer.Option(..., help="Encrypted export file to write."),
    model: str = typer.Option("smollm2"),
    cut_layer: int = typer.Option(2, "--cut-layer"),
    adapter: str = typer.Option("lora"),
    tee: str = typer.Option("simulated"),
    lr: float = typer.Option(1e-3),
    lora_r: int = typer.Option(8),
    lora_alpha: int = typer.Option(16),
    virtual_tokens: int = typer.Option(8),
    spf_ratio: float = typer.Option(0.01),
    spf_score: str = typer.Option("l1"),
    merged: bool = typer.Option(False, help="Merged weights (LoRA folded in) instead of adapter only."),
) -> None:
    """Unseal a checkpoint inside the enclave and export it encrypted to the model owner."""
    from veil.tune.data import load_model_and_tokenizer
    from veil.tune.enclave_server import build_tune_enclave, write_checkpoint
    from veil.tune.export import load_owner_public

    if not checkpoint.is_file():
        raise InputError(f"checkpoint {checkpoint} does not exist")
    pub = load_owner_public(owner_public_key)
    lm, _ = load_model_and_tokenizer(model)
    t = build_tune_enclave(
        lm,
        cut_layer=cut_layer,
        adapter=adapter,
        model_id=_model_id(model),
        lr=lr,
        adapter_options=_adapter_options(adapter, lora_r, lora_alpha, virtual_tokens, spf_ratio, spf_score),
        tee_backend=tee,
    )
    _simulated_banner(bool(t.enclave.simulated))
    step = t.restore(checkpoint.read_bytes())
    write_checkpoint(out, t.export(pub, merged=merged))
    typer.echo(f"exported step {step} ({'merged' if merged else 'adapter'}) encrypted to the owner: {out}")


@app.command("decrypt-export")
@run_cli
def decrypt_export(
    owner_key: Path = typer.Option(..., help="Model owner's key directory or private key file."),
    inp: Path = typer.Option(..., "--in", help="Encrypted export file."),
    out: Path = typer.Option(..., help="Output directory (peft adapter or model.safetensors)."),
) -> None:
    """Model owner: open an export (adapter → peft layout; merged → model.safetensors)."""
    from veil.tune.export import load_owner_private, write_export_dir

    if not inp.is_file():
        raise InputError(f"{inp} does not exist")
    meta = write_export_dir(inp.read_bytes(), load_owner_private(owner_key), out)
    sim = " (trained on a SIMULATED TEE)" if meta.get("simulated") else ""
    typer.echo(f"wrote {meta.get('kind')} export of step {meta.get('step')} to {out}{sim}")


@app.command("measurement")
@run_cli
def measurement_cmd(
    model: str = typer.Option("smollm2"),
    cut_layer: int = typer.Option(2, "--cut-layer"),
    adapter: str = typer.Option("lora"),
    lr: float = typer.Option(1e-3),
    lora_r: int = typer.Option(8),
    lora_alpha: int = typer.Option(16),
    virtual_tokens: int = typer.Option(8),
    spf_ratio: float = typer.Option(0.01),
    spf_score: str = typer.Option("l1"),
) -> None:
    """Print the enclave measurement a client should expect for this server configuration."""
    from veil.tune.enclave_server import expected_measurement

    typer.echo(
        expected_measurement(
            model_id=_model_id(model),
            cut_layer=cut_layer,
            adapter=adapter,
            lr=lr,
            adapter_options=_adapter_options(
                adapter, lora_r, lora_alpha, virtual_tokens, spf_ratio, spf_score
            ),
        )
    )
