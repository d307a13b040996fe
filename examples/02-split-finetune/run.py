"""Split fine-tuning with `veil tune server` / `veil tune client`, as two processes.

    python examples/02-split-finetune/run.py            # 30 LoRA steps, accuracy on 60 articles
    python examples/02-split-finetune/run.py --quick    # 2 steps, 8 articles (a few minutes)

The server process plays the untrusted host + a SIMULATED enclave running SmolLM2-135M's layers
2..29 with LoRA; the client process (the data owner) runs layers 0..1 on BBC News, verifies the
enclave's evidence (--allow-simulated: development only) and trains through the attested,
encrypted session. At the end the enclave exports the adapter encrypted to the model owner's
key; the owner decrypts it into a peft adapter directory.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

VEIL = str(Path(sys.executable).with_name("veil"))


def veil(*args: str, timeout: float = 300) -> str:
    r = subprocess.run([VEIL, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"veil {' '.join(args[:2])} failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 steps, 8 test articles")
    ap.add_argument("--out", type=Path, default=Path("runs/example-02"), help="working folder")
    a = ap.parse_args()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    steps, evals, max_len = ("2", "8", "64") if a.quick else ("30", "60", "112")
    lr = "0.002"
    for who in ("server", "client"):
        veil("keys", "init", "--name", f"tune-{who}", "--out", str(out / who), "--force")
    veil("keys", "trust", str(out / "server"), str(out / "client" / "cert.pem"))
    veil("keys", "trust", str(out / "client"), str(out / "server" / "cert.pem"))
    owner = out / "owner"
    if not (owner / "owner.x25519").exists():
        veil("tune", "owner-keygen", "--out", str(owner))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    export = out / "adapter.veil-export"
    export.unlink(missing_ok=True)
    log = (out / "server.log").open("w")
    server = subprocess.Popen(
        [VEIL, "tune", "server", "--listen", f"127.0.0.1:{port}", "--identity", str(out / "server"),
         "--peer", str(out / "client" / "cert.pem"), "--lr", lr, "--checkpoint-every", "0",
         "--owner-public-key", str(owner), "--export-out", str(export), "--timeout", "900"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    print(f"enclave server (SIMULATED TEE) on 127.0.0.1:{port}; the client connects…", flush=True)
    try:
        client = subprocess.run(
            [VEIL, "tune", "client", "--server", f"127.0.0.1:{port}", "--identity", str(out / "client"),
             "--peer", str(out / "server" / "cert.pem"), "--allow-simulated", "--lr", lr,
             "--max-steps", steps, "--eval-examples", evals, "--max-length", max_len,
             "--plot", str(out / "loss.png"), "--out", str(out / "summary.json"), "--timeout", "900"],
            timeout=3000,
        )
        server_rc = server.wait(timeout=300)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    if client.returncode != 0 or server_rc != 0:
        print(f"fine-tuning failed (client exit {client.returncode}, server exit {server_rc}); "
              f"see {out / 'server.log'}", file=sys.stderr)
        return 1
    veil("tune", "decrypt-export", "--owner-key", str(owner), "--in", str(export),
         "--out", str(out / "adapter"))
    summary = json.loads((out / "summary.json").read_text())
    keys = ("accuracy_before", "accuracy_after", "final_step", "simulated")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
    print(f"adapter (peft layout) in {out / 'adapter'}; loss curve {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
