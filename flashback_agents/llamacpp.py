"""An embedded llama.cpp server (through the PyPI wheel ``xllamacpp``) on loopback.

``flashback-agents serve --model PATH.gguf --port N`` runs llama.cpp's own C++ server (continuous
batching, prompt caching) in this process; ``ChatFlashBack(model="http://127.0.0.1:N/v1")`` and the
LlamaIndex ``FlashBack`` then run on it unchanged. :class:`ServerProcess` starts the same server in
a child process (tests, benchmarks) and always stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx  # transformers imports it: loaded with the package anyway

from .models import ModelLoadError, check_gguf_file, spec_gguf


@dataclass
class ServeConfig:
    """How to run the embedded llama.cpp server."""

    model: str = "smollm2-135m-instruct"  # a .gguf file, or the default model's name
    host: str = "127.0.0.1"
    port: int = 8080
    ctx_size: int = 8192        # per slot
    parallel: int = 1           # slots (concurrent conversations, each with its own prefix cache)
    threads: int | None = None  # CPU threads (default: default_threads())
    tokenizer: str | None = None  # advertised as the model id so clients find the tokenizer
    cache_ram_mib: int = 1024   # llama.cpp host-memory prompt cache (extra saved prefixes)
    flash_attn: str = "auto"    # llama.cpp flash attention: "auto" (llama.cpp decides), "on", "off"
    batch_size: int | None = None   # logical batch (llama.cpp default 2048)
    ubatch_size: int | None = None  # physical micro-batch (llama.cpp default 512)
    cache_type: str | None = None   # KV cache element type for K and V: "f16" (llama.cpp's default), "f32", "q8_0"
    warmup: bool = False
    verbose: bool = False


def resolve_gguf(model: str) -> Path:
    """The GGUF file for ``model`` (a path, or the default model's name)."""
    gguf = spec_gguf(model)
    if gguf is not None:
        return gguf
    path = Path(os.path.expanduser(model))
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    raise ModelLoadError(f"{path} is not a .gguf file; llama.cpp serves GGUF models (export one with "
                         "`flashback-agents export ADAPTER OUT --gguf OUT.gguf`).")


def default_threads() -> int:
    """Half the logical cores (about the physical ones, llama.cpp's own default), at most 8.

    llama.cpp's worker threads spin while waiting; more threads than free cores makes it far slower.
    """
    return max(1, min((os.cpu_count() or 2) // 2, 8))


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
CACHE_TYPES = {"f32": "GGML_TYPE_F32", "f16": "GGML_TYPE_F16", "bf16": "GGML_TYPE_BF16", "q8_0": "GGML_TYPE_Q8_0"}


def check_config(cfg: ServeConfig) -> None:
    """Reject bad knobs before llama.cpp sees them."""
    if cfg.flash_attn not in FLASH_ATTN:
        raise ValueError(f"flash_attn must be one of {sorted(FLASH_ATTN)}, got {cfg.flash_attn!r}")
    if cfg.cache_type is not None and cfg.cache_type not in CACHE_TYPES:
        raise ValueError(f"cache_type must be one of {sorted(CACHE_TYPES)}, got {cfg.cache_type!r}")
    for name in ("batch_size", "ubatch_size", "threads"):
        v = getattr(cfg, name)
        if v is not None and int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v!r}")


def build_params(cfg: ServeConfig) -> Any:
    """xllamacpp ``CommonParams`` for the config (loopback, prompt cache on, one slot by default)."""
    import xllamacpp as xlc

    check_config(cfg)
    params = xlc.CommonParams()
    params.model.path = str(check_gguf_file(resolve_gguf(cfg.model)))  # garbage never reaches llama.cpp
    params.hostnames = [cfg.host]
    params.port = int(cfg.port)
    params.n_ctx = int(cfg.ctx_size) * max(1, int(cfg.parallel))  # llama.cpp splits n_ctx across slots
    params.n_parallel = max(1, int(cfg.parallel))
    threads = int(cfg.threads or default_threads())
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cache_prompt = True
    params.cache_ram_mib = int(cfg.cache_ram_mib)
    params.flash_attn_type = xlc.llama_flash_attn_type(FLASH_ATTN[cfg.flash_attn])
    if cfg.batch_size:
        params.n_batch = int(cfg.batch_size)
    if cfg.ubatch_size:
        params.n_ubatch = int(cfg.ubatch_size)
    if cfg.cache_type:
        params.cache_type_k = params.cache_type_v = getattr(xlc.ggml_type, CACHE_TYPES[cfg.cache_type])
    params.warmup = bool(cfg.warmup)
    params.endpoint_props = True
    if not cfg.verbose:
        params.verbosity = 1
    if cfg.tokenizer:
        params.model_alias = {cfg.tokenizer}
    return params


def start(cfg: ServeConfig) -> Any:
    """Load the model and start listening (returns the ``xllamacpp.Server``; it serves until freed)."""
    import xllamacpp as xlc

    return xlc.Server(build_params(cfg))


def serve_forever(cfg: ServeConfig) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = start(cfg)
    print(f"flashback-agents: serving {resolve_gguf(cfg.model).name} on http://{cfg.host}:{cfg.port}/v1 "
          f"(OpenAI-compatible, prompt cache on); use ChatFlashBack(model=\"http://{cfg.host}:{cfg.port}/v1\")",
          flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        del server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """The embedded server in a child process: ``with ServerProcess(cfg) as url: ...`` (always stopped)."""

    def __init__(self, cfg: ServeConfig | None = None, *, startup_timeout: float = 120.0,
                 log_path: str | os.PathLike | None = None):
        self.cfg = cfg or ServeConfig()
        if not self.cfg.port:
            self.cfg.port = free_port(self.cfg.host)
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}/v1"

    def start(self) -> str:
        resolve_gguf(self.cfg.model)  # clear error now, not in the child
        check_config(self.cfg)
        cmd = [sys.executable, "-m", "flashback_agents.llamacpp", "--model", self.cfg.model, "--host", self.cfg.host,
               "--port", str(self.cfg.port), "--ctx-size", str(self.cfg.ctx_size),
               "--parallel", str(self.cfg.parallel), "--cache-ram-mib", str(self.cfg.cache_ram_mib)]
        if self.cfg.threads:
            cmd += ["--threads", str(self.cfg.threads)]
        if self.cfg.tokenizer:
            cmd += ["--tokenizer", self.cfg.tokenizer]
        cmd += ["--flash-attn", self.cfg.flash_attn]
        for flag, value in (("--batch-size", self.cfg.batch_size), ("--ubatch-size", self.cfg.ubatch_size),
                            ("--cache-type", self.cfg.cache_type)):
            if value is not None:
                cmd += [flag, str(value)]
        if self.cfg.verbose:
            cmd += ["--verbose"]
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"The llama.cpp server exited with code {self.proc.returncode} while starting "
                                   f"({' '.join(cmd)}); see {self.log_path or 'its output'}.")
            try:
                if httpx.get(f"http://{self.cfg.host}:{self.cfg.port}/health", timeout=1.0).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"The llama.cpp server did not come up within {self.startup_timeout:.0f} s.")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m flashback_agents.llamacpp`` (what :class:`ServerProcess` runs)."""
    ap = argparse.ArgumentParser(prog="python -m flashback_agents.llamacpp")
    ap.add_argument("--model", default=ServeConfig.model)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--ctx-size", type=int, default=8192)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--cache-ram-mib", type=int, default=1024)
    ap.add_argument("--flash-attn", choices=sorted(FLASH_ATTN), default=ServeConfig.flash_attn)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--ubatch-size", type=int, default=None)
    ap.add_argument("--cache-type", choices=sorted(CACHE_TYPES), default=None)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    try:
        serve_forever(ServeConfig(model=a.model, host=a.host, port=a.port, ctx_size=a.ctx_size, parallel=a.parallel,
                                  threads=a.threads, tokenizer=a.tokenizer, cache_ram_mib=a.cache_ram_mib,
                                  flash_attn=a.flash_attn, batch_size=a.batch_size, ubatch_size=a.ubatch_size,
                                  cache_type=a.cache_type, verbose=a.verbose))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
