from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_audit.config import Config
from vllm_audit.privacy import build_keystore, build_redactor, decrypt_field, gate, redact_text

from .conftest import record

PII = ["11010519491231002X", "13812345678", "zhang.san@example.com", "6212345678901232", "192.168.7.9"]
PROMPT = f"我是张三，身份证{PII[0]}，手机{PII[1]}，邮箱{PII[2]}，卡号{PII[3]}，IP {PII[4]}"


def test_default_policy_tags_everything_without_config() -> None:
    """With no configuration every entity in prompts, outputs and errors becomes its typed tag."""
    redact = build_redactor(Config())
    rec = redact(record(input_prompt=PROMPT, output_response=[PII[1]], error_message=f"bad {PII[2]}"))
    assert rec["input_prompt"] == (
        "我是张三，身份证<CN_ID>，手机<CN_PHONE>，邮箱<EMAIL>，卡号<BANK_CARD>，IP <IP_ADDRESS>"
    )
    assert rec["output_response"] == ["<CN_PHONE>"]
    assert rec["error_message"] == "bad <EMAIL>"
    assert rec["client_ip"] == "203.0.113.7"
    assert rec["redaction"] == {
        "policy": "default",
        "entities": {"CN_ID": 1, "CN_PHONE": 2, "EMAIL": 2, "BANK_CARD": 1, "IP_ADDRESS": 1},
    }


def test_chat_messages_redact_content_and_text_parts_only() -> None:
    """Chat content strings and text parts are redacted; roles and part types are left alone."""
    redact = build_redactor(Config())
    prompt = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": f"call {PII[1]}"}, {"type": "image_url"}]},
    ]
    rec = redact(record(input_prompt=prompt))
    assert rec["input_prompt"] == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "call <CN_PHONE>"}, {"type": "image_url"}]},
    ]


def test_embedding_inputs_keep_token_ids() -> None:
    """Lists of strings are redacted and integer token ids are kept."""
    rec = build_redactor(Config())(record(input_prompt=[PII[2], 101, 2023]))
    assert rec["input_prompt"] == ["<EMAIL>", 101, 2023]


def test_encrypt_keeps_redacted_copy_and_decrypts(make_config: Callable[..., Config]) -> None:
    """Encrypted fields keep a redacted copy and an envelope that an auditor decrypts."""
    config = make_config({"default": {"fields": {"input_prompt": {"mode": "encrypt"}}}})
    rec = build_redactor(config)(record(input_prompt=PROMPT))
    assert "<CN_ID>" in rec["input_prompt"]
    assert rec["input_prompt_enc"]["alg"] == "AES-256-GCM"
    store = build_keystore(config)
    assert store is not None
    assert decrypt_field(rec, "input_prompt", store) == PROMPT


def test_encrypt_without_redacted_copy_nulls_field(make_config: Callable[..., Config]) -> None:
    """With keep_redacted_copy = false the field is null and only the envelope remains."""
    config = make_config({"default": {"fields": {"input_prompt": {"mode": "encrypt", "keep_redacted_copy": False}}}})
    rec = build_redactor(config)(record(input_prompt=PROMPT))
    assert rec["input_prompt"] is None and rec["input_prompt_enc"]["ct"]


def test_tenant_policy_field_modes(make_config: Callable[..., Config]) -> None:
    """Per-tenant modes: hashed prompt, pseudonymised IP and e-mails, masked phones, dropped errors."""
    config = make_config(
        {
            "tenants": {
                "acme": {
                    "entities": {"EMAIL": "pseudonym", "CN_PHONE": "mask"},
                    "fields": {
                        "input_prompt": {"mode": "hash_only"},
                        "client_ip": {"mode": "pseudonym"},
                        "error_message": {"mode": "drop"},
                    },
                }
            }
        }
    )
    redact = build_redactor(config)
    rec = redact(record(input_prompt=PROMPT, output_response=f"{PII[2]} {PII[1]}", error_message="x"))
    assert rec["input_prompt"].startswith("hmac-sha256:")
    assert rec["client_ip"].startswith("ps_")
    assert rec["error_message"] is None
    assert rec["output_response"].startswith("<EMAIL:ps_") and rec["output_response"].endswith("*******5678")
    assert rec["redaction"]["policy"] == "acme"
    other = redact(record(org_id="globex", input_prompt=PROMPT))
    assert other["redaction"]["policy"] == "default" and "<CN_ID>" in other["input_prompt"]


def test_pseudonyms_match_across_records_and_fields(make_config: Callable[..., Config]) -> None:
    """The same e-mail in two records of one tenant gets one token; another tenant gets another."""
    config = make_config({"default": {"entities": {"EMAIL": "pseudonym"}}})
    redact = build_redactor(config)
    a = redact(record(input_prompt=f"to {PII[2]}"))["input_prompt"]
    b = redact(record(request_id="r2", output_response=f"{PII[2].upper()} ok"))["output_response"]
    c = redact(record(org_id="globex", input_prompt=f"to {PII[2]}"))["input_prompt"]
    assert a.removeprefix("to ") == b.removesuffix(" ok") != c.removeprefix("to ")


def test_no_raw_pii_in_serialized_record(make_config: Callable[..., Config]) -> None:
    """No raw PII value survives anywhere in the serialized record, whatever the mode."""
    config = make_config({"default": {"fields": {"input_prompt": {"mode": "encrypt"}, "client_ip": {"mode": "mask"}}}})
    redact = build_redactor(config)
    rec = redact(
        record(
            client_ip="192.168.7.9",
            input_prompt=[{"role": "user", "content": PROMPT}],
            output_response=PROMPT,
            error_message=PROMPT,
        )
    )
    blob = orjson.dumps(rec)
    for value in PII:
        assert value.encode() not in blob


def test_redact_text_scrubs_strings() -> None:
    """redact_text applies the default tag policy."""
    assert redact_text(f"user {PII[2]} failed") == "user <EMAIL> failed"


def test_huge_and_deep_values_become_unredactable(make_config: Callable[..., Config]) -> None:
    """Strings over the limit and absurdly deep nesting become <UNREDACTABLE>, never raw text."""
    config = make_config({"max_text_chars": 100})
    deep: Any = PII[1]
    for _ in range(200):
        deep = [deep]
    rec = build_redactor(config)(record(input_prompt="x" * 101 + PII[1], output_response=deep))
    assert rec["input_prompt"] == "<UNREDACTABLE>"
    assert rec["output_response"] == "<UNREDACTABLE>"
    assert rec["redaction"]["entities"]["UNREDACTABLE"] == 2


def test_tuples_and_mapping_subclasses_are_walked_like_lists_and_dicts() -> None:
    """Values built in Python (a tuple of messages, an OrderedDict, a str subclass) are scanned
    like the JSON types they stand for, never stored unscanned and never dropped."""
    from collections import OrderedDict

    class Text(str):
        pass

    prompt = (
        OrderedDict(role="user", content=f"mail {PII[2]} now"),
        {"role": "user", "content": Text(f"call {PII[1]}")},
    )
    rec = build_redactor(Config())(record(input_prompt=prompt))
    assert rec["input_prompt"] == [
        {"role": "user", "content": "mail <EMAIL> now"},
        {"role": "user", "content": "call <CN_PHONE>"},
    ]
    stored = orjson.dumps(rec).decode()
    assert PII[1] not in stored and PII[2] not in stored


def test_a_text_limit_below_short_strings_is_refused(make_config: Callable[..., Config]) -> None:
    """``max_text_chars`` under 64 is a config error naming the value (short strings seen clean are
    kept without a length check, so a smaller limit could not hold)."""
    import pytest

    from vllm_audit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max_text_chars must be at least 64 \(got 10\)"):
        make_config({"max_text_chars": 10})


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary())
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids), max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(prompt=json_value, output=json_value, err=json_value, org=json_value, ip=json_value, user=json_value)
def test_redactor_never_raises_on_garbage(prompt: Any, output: Any, err: Any, org: Any, ip: Any, user: Any) -> None:
    """Arbitrary values (bytes, surrogates, nesting, wrong types) never make the redactor raise."""
    redact = build_redactor(Config())
    rec = redact(record(input_prompt=prompt, output_response=output, error_message=err, org_id=org,
                        client_ip=ip, user_id=user))
    assert isinstance(rec["redaction"]["entities"], dict)
    assert not isinstance(rec["input_prompt"], bytes)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 -+()Xx@.:１２３ａbcE中文")), max_size=80))
def test_redact_text_never_raises_on_digit_soup(text: str) -> None:
    """Dense digit and separator soup is handled without errors."""
    assert isinstance(redact_text(text), str)


def test_short_message_parts_known_clean_still_join_into_a_value() -> None:
    """Short parts seen clean before skip their own scan, never the scan across their boundary."""
    redact = build_redactor(Config())
    parts = ["You are helpful.", "call 138 1234", " 5678 today"]
    for _ in range(3):  # later rounds: every part is in the clean-short cache
        rec = redact(record(input_prompt=[{"role": "user", "content": p} for p in parts]))
        stored = orjson.dumps(rec["input_prompt"]).decode()
        assert "1234" not in stored and "5678" not in stored, stored
        assert {"CN_PHONE": 1} == rec["redaction"]["entities"]
        assert "You are helpful." == rec["input_prompt"][0]["content"]


def test_a_message_part_too_long_to_scan_is_kept_only_when_the_whole_prompt_is_clean(
    make_config: Callable[..., Config],
) -> None:
    """The gate over the joined parts runs first only when a part is too long: clean, it is kept."""
    redact = build_redactor(make_config({"max_text_chars": 100}))
    long_clean = "word " * 30
    rec = redact(record(input_prompt=[{"role": "user", "content": p} for p in ("hello", long_clean)]))
    assert long_clean == rec["input_prompt"][1]["content"] and {} == rec["redaction"]["entities"]
    rec = redact(record(input_prompt=[{"role": "user", "content": p} for p in (f"call {PII[1]}", long_clean)]))
    assert "<UNREDACTABLE>" == rec["input_prompt"][1]["content"]
    assert PII[1] not in orjson.dumps(rec["input_prompt"]).decode()
    assert 1 == rec["redaction"]["entities"]["UNREDACTABLE"]


def test_lone_surrogates_in_message_parts_are_replaced_whatever_was_scanned_last() -> None:
    """Each part's lone surrogates become U+FFFD, however many other texts were scanned after its
    own scan (the gate's encoding memo holds only the last); clean parts stay as they are."""
    redact = build_redactor(Config())
    parts = ["héllo \ud800 there, 2025-06-03 14:22:51", "naïve text, std::vector<int> v;", "fin \udfff ¶"]
    rec = redact(record(input_prompt=[{"role": "user", "content": p} for p in parts], output_response="ça va \ud83d"))
    assert [m["content"] for m in rec["input_prompt"]] == [
        "héllo \ufffd there, 2025-06-03 14:22:51",
        "naïve text, std::vector<int> v;",
        "fin \ufffd ¶",
    ]
    assert rec["output_response"] == "ça va \ufffd"
    orjson.dumps(rec)  # storable: orjson refuses lone surrogates


def test_no_raw_text_is_kept_by_the_gate_once_a_record_or_text_is_redacted() -> None:
    """The gate's encoding slot (gate.utf8) is emptied when a record, or a log text, is done."""
    redact = build_redactor(Config())
    raw = "café: write to bob@example.com or call 13812345678"
    rec = redact(record(input_prompt=[{"role": "user", "content": raw}], output_response="très bien"))
    assert "bob@example.com" not in orjson.dumps(rec).decode()
    assert gate._last_utf8 == ("", b"")
    assert "<EMAIL>" in redact_text(raw)
    assert gate._last_utf8 == ("", b"")
