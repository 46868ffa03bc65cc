"""Sparse decode's conflicts with SGLang's own arguments are refused before the model
loads, each naming sparse.enabled (or sparse.kernel, sparse.exact_score_heads) and the flag."""

from test_plugin import python


def test_conflicting_server_arguments_are_named(tmp_path):
    config = tmp_path / "sparse.yaml"
    config.write_text("sparse:\n  enabled: true\n")
    gpu_only = tmp_path / "gpu-only.yaml"
    gpu_only.write_text("sparse:\n  enabled: true\n  kernel: flashinfer\n")
    heads = tmp_path / "heads.yaml"
    heads.write_text("sparse:\n  enabled: true\n  exact_score_heads: [[7, 2], [30, 0]]\n")
    model = tmp_path / "model"  # only its config.json is read before the model loads
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 30, "num_attention_heads": 9, '
                                       '"num_key_value_heads": 3}')
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    (windowed / "config.json").write_text('{"num_hidden_layers": 30, "num_attention_heads": 9, '
                                          '"sliding_window": 4096}')
    # A hub id downloaded before: its config.json in the Hugging Face cache's layout.
    hub = tmp_path / "hub"
    snapshot = hub / "models--someorg--windowed" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((windowed / "config.json").read_text())
    (hub / "models--someorg--windowed" / "refs").mkdir()
    (hub / "models--someorg--windowed" / "refs" / "main").write_text("0123abc")
    cases = {"mixed": [str(config), "--enable-mixed-chunk"],
             "page": [str(config), "--page-size", "16"],
             "backend": [str(config), "--attention-backend", "torch_native"],
             "no_radix": [str(config), "--disable-radix-cache"],
             "kernel": [str(gpu_only)],
             "gpu": [str(config), "--device", "cuda"],
             "heads": [str(heads), "--model-path", str(model)],
             "window": [str(config), "--model-path", str(windowed)],
             "hub_window": [str(config), "--model-path", "someorg/windowed"],
             "hub_unknown": [str(config), "--model-path", "someorg/never-downloaded"],
             "fine": [str(config)]}
    out = python(f"""
        import io, contextlib
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args
        load_plugins()
        for name, extra in {cases!r}.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    args = prepare_server_args(["--enable-kvtier", "--device", "cpu",
                                                "--model-path", "x", "--kvtier-config", *extra])
                    line = args.radix_cache_backend + " " + args.attention_backend
                except SystemExit as e:
                    line = str(e.code) + " " + err.getvalue().strip().splitlines()[-1]
            print(name, line, sep="|")
    """, env={"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    lines = dict(line.split("|", 1) for line in out.stdout.strip().splitlines()
                 if "|" in line)
    assert set(lines) == set(cases), out.stderr[-2000:]
    expected = {"mixed": "sparse.enabled: cannot be used with --enable-mixed-chunk",
                "page": "sparse.enabled: needs --page-size 1 (got 16)",
                "backend": "sparse.enabled: runs in the kvtier attention backend; "
                           "--attention-backend torch_native was given",
                "no_radix": "sparse.enabled: cannot be used with --disable-radix-cache",
                "kernel": "sparse.kernel: flashinfer needs a GPU",
                "gpu": "sparse.enabled: runs in the kvtier backend's CPU path in this release "
                       "(--device cpu); the GPU wiring is not done yet (got --device cuda)",
                "heads": "sparse.exact_score_heads: [30, 0] is not a (layer, KV head) of this "
                         "model (30 layers, 3 KV heads)",
                "window": f"sparse.enabled: cannot serve {windowed}: the model attends "
                          "through a sliding window (sliding_window: 4096)",
                "hub_window": "sparse.enabled: cannot serve someorg/windowed: the model "
                              "attends through a sliding window (sliding_window: 4096)"}
    for name, fragment in expected.items():
        assert lines[name].startswith("2 kvtier config ") and fragment in lines[name], \
            (name, lines[name])
    assert lines["fine"] == "kvtier kvtier"  # the sparse requests' radix cache and backend
    # Not in the cache: left to the backend, which checks the loaded model's config.
    assert lines["hub_unknown"] == "kvtier kvtier"
