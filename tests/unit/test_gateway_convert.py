"""Request validation and SubmitRequest building (pure functions, no I/O)."""

from __future__ import annotations

import grpc
import pytest

from accelgen.v1 import common_pb2, gateway_pb2
from gateway.config import GatewayConfig
from gateway.convert import (GRPC_NAMES, check_label, check_prompt, check_prompt_chars, resolve_slo, to_submit_request,
                             validate_request, validate_sampling)
from gateway.errors import GatewayError, http_status_of, status_of
from accelgen.core.slo import SLOCatalog

pytestmark = pytest.mark.unit

CFG = GatewayConfig()
CAT = SLOCatalog()


def _invalid(fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        fn(*args)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value


def test_client_id_is_a_checked_label() -> None:
    assert check_label("abc-1.2:3_x") == "abc-1.2:3_x"
    assert check_label("") == ""  # no label: fine, the gateway makes the id either way
    for bad in ("has space", "x" * 129, "ünïcode", "a/b"):
        assert "request_id" in _invalid(check_label, bad).message
    assert check_label("x" * 128) == "x" * 128


def test_prompt_chars_capped_before_tokenising() -> None:
    check_prompt_chars(gateway_pb2.GenerateRequest(text="x" * 10), 10)
    err = _invalid(check_prompt_chars, gateway_pb2.GenerateRequest(text="x" * 11), 10)
    assert "11 characters" in err.message and "max_prompt_chars" in err.message
    check_prompt_chars(gateway_pb2.GenerateRequest(tokenized=common_pb2.TokenizedInput(input_ids=[1] * 99)), 10)


def test_sampling_checks_and_top_p_default() -> None:
    assert validate_sampling(common_pb2.SamplingParams()).top_p == 1.0
    assert validate_sampling(common_pb2.SamplingParams(top_p=0.9)).top_p == pytest.approx(0.9)
    cases = {"temperature": dict(temperature=float("nan")), "top_p": dict(top_p=-0.1),
             "top_k": dict(top_k=-2), "max_new_tokens": dict(max_new_tokens=0)}
    for field, kwargs in cases.items():
        err = _invalid(validate_sampling, common_pb2.SamplingParams(**kwargs))
        assert f"sampling_params.{field}" in err.message and err.param == f"sampling_params.{field}"


def test_slo_resolution_order() -> None:
    spec = common_pb2.SLOSpec
    assert resolve_slo("", spec(), CFG, CAT) == ("chat", spec(ttft_ms=1000, tbt_ms=50))
    assert resolve_slo("batch", spec(), CFG, CAT) == ("batch", spec(jct_ms=600_000))
    assert resolve_slo("code", spec(ttft_ms=300, tbt_ms=30), CFG, CAT) == ("code", spec(ttft_ms=300, tbt_ms=30))
    other_default = CFG.replace(default_app_class="summarization")
    assert resolve_slo("", spec(), other_default, CAT)[1].tbt_ms == pytest.approx(500)


def test_slo_errors_name_the_field() -> None:
    spec = common_pb2.SLOSpec
    assert "known classes: chat, code, summarization, batch" in _invalid(resolve_slo, "x", spec(), CFG, CAT).message
    assert _invalid(resolve_slo, "", spec(jct_ms=-5), CFG, CAT).param == "slo.jct_ms"
    assert _invalid(resolve_slo, "", spec(ttft_ms=100), CFG, CAT).param == "slo.tbt_ms"
    assert _invalid(resolve_slo, "", spec(tbt_ms=100), CFG, CAT).param == "slo.ttft_ms"
    err = _invalid(resolve_slo, "", spec(ttft_ms=100, tbt_ms=2), CFG, CAT)
    assert err.param == "slo.tbt_ms" and "[5, 60000]" in err.message
    tight = CFG.replace(slo_ttft_ms_max=200)
    assert _invalid(resolve_slo, "", spec(ttft_ms=300, tbt_ms=20), tight, CAT).param == "slo.ttft_ms"


def test_check_prompt() -> None:
    check_prompt([1, 2, 3], 4, None)
    err = _invalid(check_prompt, [1] * 10, 10, None)
    assert "10 tokens" in err.message and "context is 10 tokens" in err.message
    assert "outside the vocabulary" in _invalid(check_prompt, [1, 300], 100, 259).message
    assert "empty" in _invalid(check_prompt, [], 100, None).message
    check_prompt([1, 300], 100, None)  # byte tokenizer: ids beyond bytes are legal for sim workers
    check_prompt([1] * 10, 20, None, max_new_tokens=10)  # exactly fills the context
    err = _invalid(check_prompt, [1] * 10, 20, None, GRPC_NAMES, 11)
    assert err.param == "sampling_params.max_new_tokens" and "at most 10 here" in err.message


def test_validate_request_and_submit() -> None:
    req = gateway_pb2.GenerateRequest(request_id="r1", text="hi", app_class="code",
                                      sampling_params=common_pb2.SamplingParams(max_new_tokens=5, seed=3))
    label, sampling, cls, slo = validate_request(req, CFG, CAT)
    assert label == "r1"
    msg = to_submit_request("gw-id", [4, 5], sampling, cls, slo, eos_token_id=2, tenant="team", label=label)
    assert (msg.request_id, list(msg.prompt_token_ids), msg.app_class) == ("gw-id", [4, 5], "code")
    assert (msg.tenant, msg.label) == ("team", "r1")
    assert msg.sampling_params.max_new_tokens == 5 and msg.sampling_params.seed == 3
    assert msg.has_eos_token_id and msg.eos_token_id == 2 and msg.slo.tbt_ms == pytest.approx(187.5)
    assert not to_submit_request("gw-id", [4], sampling, cls, slo, None).has_eos_token_id
    empty = gateway_pb2.GenerateRequest(tokenized=common_pb2.TokenizedInput())
    assert _invalid(validate_request, empty, CFG, CAT).param == "text or tokenized.input_ids"


def test_status_mapping_is_one_table() -> None:
    assert status_of(GatewayError(grpc.StatusCode.UNAVAILABLE, "m")) == (grpc.StatusCode.UNAVAILABLE, "m")
    assert status_of(RuntimeError("boom"))[0] == grpc.StatusCode.INTERNAL
    assert [http_status_of(c)[0] for c in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAUTHENTICATED,
                                           grpc.StatusCode.PERMISSION_DENIED)] == [400, 404, 429, 503, 500, 401, 403]
