"""The question-forcing logit processor (Quest's protocol on the server) and how the runner
starts servers for it. Over HTTP it runs in ``test_sparse_accuracy.py``, where the runner
fails the run unless the server's output begins with exactly the forced tokens."""

import json
from types import SimpleNamespace

import dill
import torch

from sgl_kvtier.eval.forced_tokens import ForcedTokens, forcing_params, processor_string
from sgl_kvtier.eval.runner import _server_args
from sgl_kvtier.eval.spec import RunSpec


def _row(output_ids, forced, barred=()):
    return forcing_params(forced, list(barred)) | {"__req__": SimpleNamespace(
        output_ids=list(output_ids))}


def test_each_step_may_sample_only_the_next_forced_token_then_no_barred_one():
    logits = torch.randn(4, 10)
    before = logits.clone()
    rows = [_row([], [7, 3]), _row([7], [7, 3]), _row([7, 3], [7, 3], barred=[1, 2]), None]
    out = ForcedTokens()(logits, rows)
    # Greedy picks the forced token even where it was the least likely.
    assert out[0].argmax() == 7 and out[1].argmax() == 3
    assert torch.isinf(out[0]).sum() == 9 and torch.isinf(out[1]).sum() == 9
    # After the question: only the barred tokens are removed, the rest is the model's.
    assert torch.isinf(out[2, [1, 2]]).all()
    keep = [0, 3, 4, 5, 6, 7, 8, 9]
    assert torch.equal(out[2, keep], before[2, keep])
    assert torch.equal(out[3], before[3])  # a request without the processor's parameters


def test_the_request_field_loads_back_as_sglang_loads_it():
    # SGLang's CustomLogitProcessor.from_str: dill-load the hex of "callable", then call it.
    data = json.loads(processor_string())
    cls = dill.loads(bytes.fromhex(data["callable"]))
    assert cls is ForcedTokens and callable(cls())


def _spec(**ruler):
    return RunSpec.model_validate({
        "name": "t", "model": "smollm2", "servers": [{"name": "dense", "args": []}],
        "workloads": [{"kind": "ruler", "tasks": ["niah_single_1"], "lengths": [1024],
                       **ruler}]})


def test_the_runner_enables_the_processor_only_for_forced_tokens(tmp_path):
    folder = SimpleNamespace(path=tmp_path)

    def args(spec):
        return _server_args(spec, spec.servers[0], tmp_path, folder)

    forced = args(_spec(question_in_decode=True))
    assert "--enable-custom-logit-processor" in forced
    assert "--disable-overlap-schedule" in forced  # the processor counts output so far
    for spec in (_spec(), _spec(question_in_decode=True, forcing="regex")):
        assert "--enable-custom-logit-processor" not in args(spec)
        assert "--disable-overlap-schedule" not in args(spec)
