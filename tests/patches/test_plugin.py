"""The plugin against real SGLang 0.5.23: flags, config errors, hook targets, idempotency,
version drift, and no change at all without --enable-kvtier. Each case runs in a fresh
interpreter, as SGLang's processes do."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

LAUNCH = [sys.executable, "-m", "sglang.launch_server"]


def python(code: str, env: dict | None = None, timeout: float = 300):
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_explains_both_flags():
    out = subprocess.run([*LAUNCH, "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "--enable-kvtier Turn on sgl_kvtier" in text
    assert "--kvtier-config FILE.yaml YAML file with the sections tier" in text


def test_bad_config_stops_the_real_launcher_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tier:\n  capacity: -3GB\n")
    start = time.monotonic()
    out = subprocess.run([*LAUNCH, "--enable-kvtier", "--kvtier-config", str(bad), "--device",
                          "cpu", "--model-path", str(tmp_path / "no-model")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"kvtier config {bad}: tier.capacity: expected a non-negative size; got '-3GB'")
    assert "Load weight" not in out.stderr + out.stdout
    assert time.monotonic() - start < 120


def test_each_kind_of_bad_input_through_argument_parsing(tmp_path):
    cases = {"unknown": "sparse:\n  budget: 3\n", "type": "prefill:\n  chunk_tokens: many\n",
             "negative": "tier:\n  read_bandwidth_limit: -1\n", "yaml": "tier: : :\n",
             "page": "tier:\n  enabled: true\n  chunk_tokens: 100\n"}
    for name, text in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "unreadable.yaml").mkdir()  # a directory cannot be read as a file
    out = python(f"""
        import sys, io, contextlib
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args
        load_plugins()
        for name in ["unknown", "type", "negative", "yaml", "unreadable", "page"]:
            err = io.StringIO()
            extra = ["--page-size", "64"] if name == "page" else []
            with contextlib.redirect_stderr(err):
                try:
                    prepare_server_args(["--enable-kvtier", "--kvtier-config",
                                         "{tmp_path}/" + name + ".yaml", "--model-path", "x",
                                         *extra])
                    code = 0
                except SystemExit as e:
                    code = e.code
            print(name, code, err.getvalue().strip().splitlines()[-1], sep="|")
    """)
    lines = dict(line.split("|", 1) for line in out.stdout.strip().splitlines())
    assert set(lines) == {"unknown", "type", "negative", "yaml", "unreadable", "page"}, \
        out.stderr[-2000:]
    expected = {"unknown": "sparse.budget: unknown key; expected one of: enabled",
                "type": "prefill.chunk_tokens: input should be a valid integer",
                "negative": "tier.read_bandwidth_limit: expected a non-negative size",
                "yaml": "not valid YAML at line 1", "unreadable": "cannot read the file",
                "page": "tier.chunk_tokens: must be a multiple of --page-size 64; got 100"}
    for name, fragment in expected.items():
        code, line = lines[name].split("|", 1)
        assert code == "2" and f"kvtier config {tmp_path}/{name}.yaml: " in line
        assert fragment in line, line


SPAWNED_CHECK = """
    import multiprocessing as mp, os, json

    def child(queue):
        from sglang.srt.plugins import load_plugins
        from sglang.srt.plugins.hook_registry import HookRegistry
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        import sgl_kvtier.patches as p
        load_plugins()
        p.register()  # a second call must change nothing
        counts = {t: sum(fn.__module__.startswith("sgl_kvtier") for _, fn, _ in
                         HookRegistry._hooks[t]) for t in p.hook_targets()}
        import torch
        queue.put({"targets": p.hook_targets(), "patched": sorted(HookRegistry._patched),
                   "counts": counts, "backend": "kvtier" in ATTENTION_BACKENDS,
                   "active": p.is_active(), "cuda_initialised": torch.cuda.is_initialized()})

    if __name__ == "__main__":
        os.environ["KVTIER_ENABLED"] = "1"  # what the launcher leaves to its children
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=child, args=(q,))
        proc.start()
        print(json.dumps(q.get(timeout=240)))
        proc.join()
"""


def test_every_target_resolves_in_a_spawned_child(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(SPAWNED_CHECK))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert "sglang.srt.managers.scheduler.Scheduler.get_internal_state" in state["targets"]
    assert "sglang.srt.server_args.ServerArgs.from_cli_args" in state["targets"]
    assert set(state["targets"]) <= set(state["patched"])
    assert set(state["counts"].values()) == {1}
    assert state["backend"] and state["active"]
    assert state["cuda_initialised"] is False


def test_registering_twice_in_the_launcher_is_harmless():
    out = python("""
        import argparse
        from sglang.srt.plugins import load_plugins
        from sglang.srt.plugins.hook_registry import HookRegistry
        from sglang.srt.server_args import ServerArgs
        import sgl_kvtier.patches as p
        load_plugins(); p.register(); p.register()
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)  # a duplicate flag would raise here
        args = parser.parse_args(["--model-path", "x", "--enable-kvtier"])
        print(args.enable_kvtier, [sum(fn.__module__.startswith("sgl_kvtier") for _, fn, _ in
                                       HookRegistry._hooks[t]) for t in p.hook_targets()])
    """)
    assert out.stdout.strip() == "True [1, 1]", out.stderr[-2000:]


def test_without_the_flag_server_args_equal_stock():
    out = python("""
        import json, os, sys, msgspec
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args
        argv = ["--model-path", "m", "--device", "cpu", "--max-total-tokens", "4096"]
        if sys.argv[-1] == "plugin":
            load_plugins()
        args = prepare_server_args(argv)
        print(json.dumps({"fields": msgspec.structs.asdict(args), "extra": sorted(vars(args)),
                          "env": {k: v for k, v in os.environ.items() if "KVTIER" in k
                                  or k == "SGLANG_USE_CPU_ENGINE"}}, default=str))
    """.replace("sys.argv[-1]", "'plugin'"))
    with_plugin = json.loads(out.stdout.strip().splitlines()[-1])
    out = python("""
        import json, os, msgspec
        from sglang.srt.server_args import prepare_server_args
        args = prepare_server_args(["--model-path", "m", "--device", "cpu",
                                    "--max-total-tokens", "4096"])
        print(json.dumps({"fields": msgspec.structs.asdict(args), "extra": sorted(vars(args)),
                          "env": {}}, default=str))
    """, env={"SGLANG_PLUGINS": "none-at-all"})
    stock = json.loads(out.stdout.strip().splitlines()[-1])
    with_plugin["fields"].pop("random_seed"), stock["fields"].pop("random_seed")
    assert with_plugin == stock


DRIFT = """
    import runpy, sys
    import sgl_kvtier.patches.cli as cli
    from sglang.srt.plugins.hook_registry import HookType
    # What SGLang version drift looks like: a method the plugin hooks no longer exists.
    cli.HOOKS.append(("sglang.srt.server_args.ServerArgs.renamed_in_a_later_release",
                      lambda original, *a, **k: original(*a, **k), HookType.AROUND))
    sys.argv = ["launch_server", "--enable-kvtier", "--device", "cpu", "--model-path", "x"]
    runpy.run_module("sglang.launch_server", run_name="__main__")
"""


def test_version_drift_stops_the_server_with_one_line():
    out = python(DRIFT)
    assert out.returncode == 3
    assert out.stderr.strip().splitlines()[-1] == (
        "sgl_kvtier: SGLang hook target "
        "sglang.srt.server_args.ServerArgs.renamed_in_a_later_release not found (1 missing); "
        "this sgl_kvtier supports SGLang 0.5.23, installed is 0.5.23")


def test_version_drift_without_the_flag_only_warns():
    out = python(DRIFT.replace('"--enable-kvtier", ', "").replace(
        'runpy.run_module("sglang.launch_server", run_name="__main__")',
        "from sglang.srt.plugins import load_plugins; load_plugins(); print('served on')"))
    assert out.returncode == 0 and out.stdout.strip() == "served on"
    assert "--enable-kvtier will refuse to start" in out.stderr


def test_flags_work_from_sglangs_own_config_file(tmp_path):
    kvtier_yaml = tmp_path / "kvtier.yaml"
    kvtier_yaml.write_text("sparse:\n  rank_min: 64\n")
    server_yaml = tmp_path / "server.yaml"
    server_yaml.write_text(f"model-path: m\nenable-kvtier: true\nkvtier-config: {kvtier_yaml}\n")
    out = python(f"""
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args
        load_plugins()
        args = prepare_server_args(["--config", "{server_yaml}", "--device", "cpu"])
        print(args.attention_backend, args._kvtier["config"]["sparse"]["rank_min"])
    """)
    assert out.stdout.strip().splitlines()[-1] == "kvtier 64", out.stderr[-2000:]
