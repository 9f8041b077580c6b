"""--kv-codec auto's choice per layer (transfer/codec_choice.py); end to end: test_kv_transfer.py
(a slow link) and test_kv_serving_path.py (loopback between processes)."""

from __future__ import annotations

import pytest

from pdserve.transfer.codec_choice import MEASURE_BYTES, AutoCodec, FixedCodec, codec_policy
from pdserve.transfer.codecs import get_codec


def choice(policy: AutoCodec, behind: bool) -> tuple[str, str]:
    chosen = policy.choose(behind)
    return chosen.codec.name, chosen.reason


def test_raw_while_nothing_waits_for_the_link() -> None:
    policy = AutoCodec()
    policy.sent(MEASURE_BYTES * 10, 100.0, behind=False)  # slow sends while keeping up say nothing
    assert choice(policy, behind=False) == ("none", "link_keeps_up")
    assert choice(policy, behind=True) == ("none", "measuring")


def test_int8_once_a_link_behind_the_prefill_measures_slow() -> None:
    policy = AutoCodec()
    policy.sent(MEASURE_BYTES // 2, 0.5, behind=True)
    assert choice(policy, behind=True) == ("none", "measuring")
    policy.sent(MEASURE_BYTES, 1.0, behind=True)  # ~1 MB/s
    assert choice(policy, behind=True) == ("int8", "slow_link")
    assert choice(policy, behind=False) == ("none", "link_keeps_up")


def test_raw_on_a_link_faster_than_the_codec() -> None:
    policy = AutoCodec()
    policy.sent(MEASURE_BYTES * 4, MEASURE_BYTES * 4 / 5e9, behind=True)  # 5 GB/s
    assert choice(policy, behind=True) == ("none", "fast_link")
    assert policy.link_bytes_per_s == pytest.approx(5e9)


def test_a_named_codec_is_fixed_and_an_unknown_one_refused() -> None:
    fixed = codec_policy("int8")
    assert isinstance(fixed, FixedCodec) and fixed.name == "int8"
    assert fixed.choose(True).codec is get_codec("int8") and fixed.choose(False).reason == "fixed"
    assert isinstance(codec_policy("auto"), AutoCodec)
    with pytest.raises(ValueError, match="unknown KV codec"):
        codec_policy("zstd")
