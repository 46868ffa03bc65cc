"""Start, query and stop an SGLang server as a child process (for demos, tests, evals).

The server runs in its own process group on a free loopback port, writes its log to a
file, and is stopped with its whole group (scheduler and detokenizer included) on
``stop()``, on leaving the ``with`` block, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

__all__ = ["Server", "ServerError", "Generation", "TeacherForced", "ScoredDecode", "free_port",
           "port_is_free", "group_alive"]


class ServerError(RuntimeError):
    """The server failed to start or to answer; the message ends with its log's tail."""


class _PortTaken(ServerError):
    """Another process bound the server's port between the check and the server's bind."""


@dataclass
class Generation:
    """One streamed ``/generate`` call, timed on the client."""

    text: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float  # request sent -> first streamed chunk
    total_s: float
    token_times: list[float] = field(default_factory=list, repr=False)
    # e.g. {"device": 0, "host": 0, "storage": 2047}
    cached_details: dict = field(default_factory=dict)

    @property
    def decode_s_per_token(self) -> float:
        """Mean time between streamed tokens after the first (NaN for one token)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else float("nan")


@dataclass
class TeacherForced:
    """Next-token log-probabilities at each position of a scored text (positions 1..n-1)."""

    token_logprobs: list[float]  # (n-1,) log p(x_t | x_<t)
    top_ids: list[list[int]]  # (n-1, k) most likely next tokens given x_<t
    top_logprobs: list[list[float]]  # (n-1, k) their log-probabilities, descending


@dataclass
class ScoredDecode:
    """A greedy continuation with the server's log-probabilities at each generated step."""

    output_ids: list[int]  # (T,) generated tokens
    token_logprobs: list[float]  # (T,) log-probability of each generated token
    top_ids: list[list[int]]  # (T, k) most likely tokens at each step
    top_logprobs: list[list[float]]  # (T, k) their log-probabilities, descending
    prompt_tokens: int
    cached_tokens: int


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(low: int = 10000, high: int = 21999) -> int:
    """A free loopback port below the kernel's ephemeral range.

    The server binds its port some 20-50 s after it was picked; a port from the ephemeral
    range can be handed meanwhile to any outgoing connection or ``bind(0)`` (the server's
    own processes open several), so pick outside it. SGLang picks its internal ports in
    22000-29999, hence the range below that.
    """
    high = min(high, _ephemeral_low() - 1)
    candidates = list(range(low, high + 1))
    random.shuffle(candidates)
    for port in candidates[:256]:
        if port_is_free(port):
            return port
    with socket.socket() as s:  # the low range is exhausted: fall back to the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def group_alive(pgid: int) -> bool:
    """True while any live (non-zombie) process belongs to process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Server:
    """``python -m sglang.launch_server ARGS`` on ``127.0.0.1:<free port>``.

    Parameters
    ----------
    args : list of str
        Server arguments, passed verbatim (``--host``/``--port`` are added).
    log_path : Path
        File receiving the server's stdout and stderr.
    env : dict, optional
        The server's whole environment (default: a copy of this process's).
    rlimits : dict, optional
        ``resource.RLIMIT_*`` -> limit for the server's processes (e.g. a file size cap to
        make its disk writes fail).
    launcher : list of str, optional
        The command before ``args`` (default: this interpreter running
        ``sglang.launch_server``); any HTTP server taking ``--host``/``--port`` and
        answering ``/health`` will do.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 startup_timeout: float = 300.0, rlimits: dict[int, int] | None = None,
                 launcher: list[str] | None = None):
        self.args, self.log_path = list(args), Path(log_path)
        self.launcher = list(launcher or [sys.executable, "-m", "sglang.launch_server"])
        self.env = dict(os.environ if env is None else env)
        self.rlimits = dict(rlimits or {})
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, attempts: int = 3) -> Server:
        """Launch the server and wait for its health check; a port lost to another process
        at bind time (SGLang then waits forever instead of exiting) means a fresh port and
        a fresh launch, up to ``attempts`` launches."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self._claim_port()
            self._launch(append=attempt > 0)
            try:
                self._wait_ready()
                return self
            except _PortTaken:
                self.stop()
                lost = self.port
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                with open(self.log_path, "a") as log:
                    log.write(f"# sgl_kvtier harness: port {lost} was taken at bind time; "
                              f"launching again on {self.port}\n")
            except BaseException:  # a failed start, Ctrl-C while waiting: leave nothing behind
                self.stop()
                raise
        raise ServerError(f"no free port held through {attempts} launches; see {self.log_path}")

    def _launch(self, append: bool) -> None:
        cmd = [*self.launcher, *self.args,
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "a" if append else "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True,
                                         preexec_fn=self._apply_rlimits if self.rlimits else None)
        atexit.register(self.stop)

    def _claim_port(self) -> None:
        """Move to another free port if this one was taken since it was picked."""
        if not port_is_free(self.port):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"

    def _lost_port(self) -> bool:
        """True once the log says the HTTP server could not bind this server's port."""
        marker = f"attempting to bind on address ('127.0.0.1', {self.port}): address already"
        try:
            return marker in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def _apply_rlimits(self) -> None:
        import resource

        for which, limit in self.rlimits.items():
            resource.setrlimit(which, (limit, limit))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self._lost_port():
                raise _PortTaken(self.port)
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with status {self.proc.returncode} during "
                                  f"start-up; last lines of {self.log_path}:\n"
                                  f"{_tail(self.log_path)}")
            time.sleep(0.5)
        raise ServerError(f"server not ready after {self.startup_timeout:.0f} s; last lines "
                          f"of {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server's process group, kill what lingers, and return only once
        no process of the group is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        self._signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10.0
        while group_alive(proc.pid) and time.monotonic() < deadline:
            self._signal_group(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        proc.wait()

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def generate(self, prompt: str | list[int], max_new_tokens: int = 16,
                 timeout: float = 1200.0, cache_salt: str | None = None,
                 logit_processor: str | None = None, **sampling) -> Generation:
        """Greedy (unless ``sampling`` says otherwise) streamed generation, timed.
        ``cache_salt`` scopes prefix reuse to requests with the same salt (a tenant);
        ``logit_processor`` is SGLang's serialised custom logit processor (its parameters go
        in ``sampling["custom_params"]``; the server needs ``--enable-custom-logit-processor``)."""
        body = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                    **sampling}, "stream": True}
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        if logit_processor is not None:
            body["custom_logit_processor"] = logit_processor
        body["input_ids" if isinstance(prompt, list) else "text"] = prompt
        start = time.perf_counter()
        times, last = [], None
        try:
            with requests.post(f"{self.url}/generate", json=body, stream=True,
                               timeout=timeout) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise ServerError(f"generation failed: {chunk['error']}")
                    times.append(time.perf_counter() - start)
                    last = chunk
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise self._broken(exc) from exc
        if last is None:
            raise ServerError("the server streamed no output")
        meta = last["meta_info"]
        return Generation(text=last.get("text", ""), output_ids=last.get("output_ids", []),
                          prompt_tokens=meta["prompt_tokens"],
                          cached_tokens=meta.get("cached_tokens", 0), ttft_s=times[0],
                          total_s=times[-1], token_times=times,
                          cached_details=meta.get("cached_tokens_details") or {})

    def _broken(self, exc: Exception) -> ServerError:
        # A stream cut short usually means the server died: say so, with its last words,
        # so that a failing test shows the cause and not only the client's side.
        state = ("running" if self.proc is not None and self.proc.poll() is None
                 else "no longer running")
        return ServerError(f"the connection broke ({exc}); the server is {state}; last "
                           f"lines of {self.log_path}:\n{_tail(self.log_path, 40)}")

    def next_token_logprobs(self, input_ids: list[int], top_k: int, start: int = 0,
                            timeout: float = 1200.0) -> TeacherForced:
        """Teacher-forced scoring of ``input_ids``: for every position ``t > start`` the
        model's log-probability of token ``t`` and its ``top_k`` most likely tokens given
        ``[:t]``.

        One prefill and one output token. SGLang reuses cached KV for at most the first
        ``start`` tokens (it recomputes from ``logprob_start_len`` on), so ``start > 0`` with
        a cached ``input_ids[:start]`` scores an extend over a cached prefix.
        """
        body = {"input_ids": input_ids, "return_logprob": True, "logprob_start_len": start,
                "top_logprobs_num": top_k,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        resp = requests.post(f"{self.url}/generate", json=body, timeout=timeout)
        if resp.status_code != 200:
            raise ServerError(f"scoring failed ({resp.status_code}): {resp.text[:300]}")
        meta = resp.json()["meta_info"]
        # Position `start` is not scored (SGLang reports None there).
        token = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
        top = meta["input_top_logprobs"][1:]
        return TeacherForced(token_logprobs=token,
                             top_ids=[[tid for _, tid, _ in row] for row in top],
                             top_logprobs=[[lp for lp, _, _ in row] for row in top])

    def scored_decode(self, input_ids: list[int], max_new_tokens: int, top_k: int,
                      timeout: float = 1200.0) -> ScoredDecode:
        """Greedy generation of exactly ``max_new_tokens`` tokens (EOS ignored) after
        ``input_ids``, with the ``top_k`` most likely tokens and their log-probabilities at
        each step."""
        body = {"input_ids": input_ids, "return_logprob": True, "top_logprobs_num": top_k,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                    "ignore_eos": True}}
        resp = requests.post(f"{self.url}/generate", json=body, timeout=timeout)
        if resp.status_code != 200:
            raise ServerError(f"scored decode failed ({resp.status_code}): {resp.text[:300]}")
        out = resp.json()
        meta = out["meta_info"]
        top = meta["output_top_logprobs"]
        return ScoredDecode(output_ids=out["output_ids"],
                            token_logprobs=[lp for lp, _, _ in meta["output_token_logprobs"]],
                            top_ids=[[tid for _, tid, _ in row] for row in top],
                            top_logprobs=[[lp for lp, _, _ in row] for row in top],
                            prompt_tokens=meta["prompt_tokens"],
                            cached_tokens=meta.get("cached_tokens", 0))

    def flush_cache(self) -> None:
        requests.post(f"{self.url}/flush_cache", timeout=60).raise_for_status()

    def server_info(self) -> dict:
        return requests.get(f"{self.url}/get_server_info", timeout=30).json()
