"""Helpers shared by the spikecore tests (uniquely named: all packages' tests share one sys.path)."""

import contextlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import yaml

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- hostile files: shared by every package's checkpoint-safety tests ---------------------------------------
class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def crafted_checkpoint(path, marker):
    """A file that looks like a Lightning checkpoint and, fully unpickled, creates ``marker``."""
    torch.save(
        {
            "state_dict": {},
            "pytorch-lightning_version": "2.6.0",
            "hyper_parameters": {},
            "x": Payload(marker),
        },
        path,
    )
    return path


@contextlib.contextmanager
def serve_folder(folder):
    """A loopback HTTP server for ``folder``: yields (base URL, list of the paths it was asked for)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def log_message(self, *a):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def one_error_line(proc) -> str:
    """A console script's run that ended on a user error: exit 2, one ``error:`` line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def refuse_crafted_checkpoints(tmp_path, module: str, command_lines) -> None:
    """Run ``python -m module`` on a crafted checkpoint given from disk and from a loopback URL:
    ``command_lines(source, config_naming_it)`` lists the argument lists to try. Each must end with one
    ``error:`` line naming the file and exit 2; no request may reach the server, no code may run, and
    nothing may be written under ``tmp_path / "runs"``."""
    import os
    import subprocess
    import sys

    import yaml

    marker = tmp_path / "pwned"
    crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with serve_folder(tmp_path) as (base, requests):
        for source in (str(tmp_path / "evil.ckpt"), f"{base}/evil.ckpt"):
            named = tmp_path / "ckpt.yaml"
            named.write_text(yaml.safe_dump({"ckpt_path": source}))
            for argv in command_lines(source, str(named)):
                command = [sys.executable, "-m", module, *argv]
                proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
                line = one_error_line(proc)
                assert "evil.ckpt" in line and ("URL" in line or "refused for safety" in line), line
    assert requests == [] and not marker.exists()
    assert not (tmp_path / "runs").exists()


# -- a tiny Spikformer on the embedded digits: the CLI tests' run config -------------------------------------
TINY_SPIKFORMER = {"img_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 4, "backend": "torch"}


def write_config(tmp_path: Path, name: str = "cfg.yaml", logger: bool = True, **extra) -> Path:
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 2,
        "limit_predict_batches": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "default_root_dir": str(tmp_path / "runs"),
    }
    if logger:
        trainer["logger"] = {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": "exp"},
        }
    else:
        trainer["logger"] = False
    cfg = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"arch": "spikformer_4_384", "T": 2, "arch_kwargs": TINY_SPIKFORMER, "warmup_epochs": 0},
        "data": {
            "class_path": "spikecore.data.DigitsDataModule",
            "init_args": {"root": str(tmp_path / "data"), "img_size": 16, "batch_size": 8, "num_workers": 0},
        },
    }
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path
