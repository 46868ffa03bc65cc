"""Run files: the shipped ones are valid; mistakes are one line naming the key."""

from pathlib import Path

import pytest

from sgl_kvtier.config import ConfigError
from sgl_kvtier.eval.__main__ import main
from sgl_kvtier.eval.spec import load_spec

CONFIGS = Path(__file__).resolve().parents[2] / "eval" / "configs"
GOOD = """
name: t
servers:
  - {name: a, args: [--attention-backend, torch_native]}
  - {name: b, args: [--enable-kvtier], kvtier: {}}
workloads:
  - {kind: latency, lengths: [64]}
gates:
  - {metric: ttft_s, phase: repeat, server: b, baseline: a, prompt_tokens: 64, max_ratio: 1.0}
"""


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_files_are_valid(path):
    assert load_spec(path).servers


def error_for(tmp_path, text) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"eval run {path}: ") and "\n" not in message
    return message


def test_good_file_parses_and_hash_is_stable(tmp_path):
    (tmp_path / "run.yaml").write_text(GOOD)
    spec = load_spec(tmp_path / "run.yaml")
    assert spec.digest() == load_spec(tmp_path / "run.yaml").digest()
    assert spec.workloads[0].decode_tokens == 16
    # A reworded description measures the same; a changed setting does not.
    assert spec.model_copy(update={"description": "other words"}).digest() == spec.digest()
    assert spec.model_copy(update={"seed": spec.seed + 1}).digest() != spec.digest()


@pytest.mark.parametrize("change,fragment", [
    (("lengths: [64]", "lengths: [64], warmup: 3"), "workloads.0.warmup: unknown key"),
    (("kind: latency", "kind: magic"), "workloads.0: unknown workload kind"),
    (("kind: latency", "kind: ruler"), "workloads.0.tasks: Field required"),
    (("{kind: latency, lengths: [64]}", "{kind: ruler, tasks: [cwe], lengths: [64]}"),
     "unknown RULER task 'cwe'"),
    (("{kind: latency, lengths: [64]}", "{kind: ruler, tasks: [vt], lengths: [64], "
                                        "num_samples: 3, indices: [0, 3]}"),
     "indices: 3 is not a sample index below num_samples (3)"),
    (("baseline: a", "baseline: c"), "gate 0 names server 'c'"),
    (("metric: ttft_s", "metric: speed"), "gates.0: unknown gate metric"),
    (("phase: repeat", "phase: warm"), "gates.0.phase: Input should be"),
    (("max_ratio: 1.0}", "max_ratio: 1.0}\n  - {metric: kl, server: b, max_value: 0.1}"),
     "gate on kl needs an agreement workload"),
    (("max_ratio: 1.0}", "max_ratio: 1.0}\n  - {metric: score, server: b, task: vt, length: 64, "
                          "min_value: 50}"), "score gate on task 'vt', which no ruler"),
    (("max_ratio: 1.0}", "max_ratio: 1.0}\n  - {metric: score, server: b, length: 64, "
                          "max_drop: 5}"), "max_drop needs a baseline server"),
    (("{kind: latency, lengths: [64]}", "{kind: agreement, reference: z, lengths: [64]}"),
     "agreement reference names server 'z'"),
    (("{kind: latency, lengths: [64]}", "{kind: agreement, reference: a, lengths: [64], "
                                        "top_k: 500}"), "workloads.0.top_k"),
    (("kvtier: {}", "kvtier: {tier: {chunk_tokens: -1}}"), "tier.chunk_tokens"),
    (("args: [--enable-kvtier], ", "args: [], "), "a kvtier config needs --enable-kvtier"),
    (("max_ratio: 1.0", "max_ratio: 1.0, min_ratio: 0.1"), "exactly one of"),
    (("lengths: [64]", "lengths: ['64']"), "workloads.0.lengths.0"),
])
def test_mistakes_name_the_key(tmp_path, change, fragment):
    assert fragment in error_for(tmp_path, GOOD.replace(*change))


def test_cli_exits_2_on_a_bad_file_before_starting_anything(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(GOOD.replace("name: t", "name: t\nmodle: x"))
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "runs")]) == 2
    assert "modle: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_list_shows_shipped_files(capsys):
    assert main(["list", "--dir", str(CONFIGS)]) == 0
    assert "quickstart.yaml" in capsys.readouterr().out


def test_missing_model_is_one_line_and_starts_nothing(tmp_path, capsys):
    bad = GOOD.replace("name: t", f"name: t\nmodel: {tmp_path}/nowhere")
    (tmp_path / "run.yaml").write_text(bad)
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model '{tmp_path}/nowhere': not an")
    assert not (tmp_path / "runs").exists()


HOSTED = """
name: h
servers:
  - {name: sparse, args: [--enable-kvtier], kvtier: {sparse: {enabled: true}}}
  - {name: dense, host: sparse, request_params: {kvtier_sparse: false}}
  - {name: narrow, host: sparse, request_params: {kvtier_sparse_budget: 0.03}}
  - {name: alone, args: [--attention-backend, torch_native]}
workloads:
  - {kind: ruler, reference: dense, tasks: [niah_single_1], lengths: [512]}
"""


def test_entries_on_another_entrys_server_group_with_it(tmp_path):
    (tmp_path / "run.yaml").write_text(HOSTED)
    spec = load_spec(tmp_path / "run.yaml")
    assert [[s.name for s in g] for g in spec.groups()] == [["sparse", "dense", "narrow"],
                                                           ["alone"]]
    assert spec.groups()[0][2].request_params == {"kvtier_sparse_budget": 0.03}


@pytest.mark.parametrize("change,fragment", [
    (("host: sparse, request_params: {kvtier_sparse: false}", "host: nowhere"),
     "server dense names host 'nowhere'"),
    (("{name: narrow, host: sparse,", "{name: narrow, host: dense,"),
     "server narrow's host 'dense' runs on another server itself"),
    (("{name: dense, host: sparse,", "{name: dense, host: sparse, args: [--x],"),
     "server dense runs on sparse's server: it takes no args or kvtier"),
    (("lengths: [512]}", "lengths: [512]}\n  - {kind: latency, lengths: [64]}"),
     "only RULER workloads do; this run file has latency"),
    (("request_params: {kvtier_sparse: false}", "request_params: [1]"),
     "servers.1.request_params"),
    (("{kvtier_sparse_budget: 0.03}", "{kvtier_sparse_budget: 3}"),
     "server narrow: request_params: custom_params.kvtier_sparse_budget must be a number"),
])
def test_hosted_entry_mistakes_name_the_key(tmp_path, change, fragment):
    assert fragment in error_for(tmp_path, HOSTED.replace(*change))
