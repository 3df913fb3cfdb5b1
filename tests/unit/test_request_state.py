"""A request's explicit life (RequestState) and its finish reasons, mapped to the APIs' names in one place."""

import pytest
from helpers import ToyTokenizer, random_heads, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import FinishReason, RequestState, SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_a_request_goes_waiting_prefilling_decoding_finished(model):
    engine = Engine(TorchRunner(model, max_slots=2), ToyTokenizer(), random_heads(model), speculation="chain-2",
                    cost_model=CostModel.from_function(lambda n: 0.01), prefill_budget=8)
    handle = engine.submit(list(range(3, 23)), SamplingParams(max_tokens=5, ignore_eos=True))
    (req,) = engine.waiting
    assert req.state is RequestState.WAITING and req.slot is None
    seen = []
    while handle.finished is None:
        engine.step()
        seen.append(req.state)
    # 20 prompt tokens under an 8-token budget: three prefill steps, the last one gives the first token
    assert seen[:2] == [RequestState.PREFILLING] * 2 and seen[2] is RequestState.DECODING
    assert seen[-1] is RequestState.FINISHED and RequestState.PREFILLING not in seen[2:]
    assert req.heads_ready and req.slot is None and req.acceptance is not None
    assert handle.result().finish_reason is FinishReason.LENGTH and len(handle.result().token_ids) == 5


def test_finish_reasons_map_to_openai_and_tgi_names_in_one_place():
    assert {r.value: r.openai for r in FinishReason} == {
        "length": "length", "eos_token": "stop", "stop_sequence": "stop", "cancelled": "cancelled",
        "error": "error"}
    assert {r for r in FinishReason if r.completed} == {FinishReason.LENGTH, FinishReason.EOS_TOKEN,
                                                        FinishReason.STOP_SEQUENCE}
    assert {r.counter for r in FinishReason} == {"finished", "cancelled", "errors"}
    assert str(FinishReason.EOS_TOKEN) == "eos_token" == FinishReason.EOS_TOKEN  # TGI's name, as JSON gives it
