"""The one normal form of an address: every spelling of a mailbox, and what is refused."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobstream.consumers.mail.addresses import (
    MAX_ADDRESS_CHARS,
    AddressError,
    _normal,
    normalize_address,
    normalize_each,
)

VICTIM = "victim@example.com"

SAME_MAILBOX = [
    "victim@example.com",
    "VICTIM@EXAMPLE.COM",
    "victim@Example.Com",
    "<victim@example.com>",
    "victim@example.com(comment)",
    "victim@example.com (comment)",
    "(c)victim(d)@(e)example.com",
    "x<victim@example.com>",
    "Victim Person <victim@example.com>",
    '"Person, Victim" <victim@example.com>',
    "=?utf-8?q?Vict=C3=AFm?= <victim@example.com>",
    '"victim"@example.com',
    '"vic\\tim"@example.com',
    "<@relay.example:victim@example.com>",
    "victim@example.com,",
    "victim @ example.com",
    "victim@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",  # fullwidth: UTS #46 maps it
]

REFUSED = {
    "victim@example.com, other@example.com": "several addresses",
    "victim@example.com,other": "several addresses",
    "victim@example.com other@example.com": "not a valid address",
    "victim@example.com;other@example.com": "not a valid address",
    "group:victim@example.com;": "is a group",
    "group:;": "no address",
    "": "no address",
    "victim": "no domain",
    "victim@": "not a valid address",
    "@example.com": "not a valid address",
    '""@example.com': "no local part",
    "victim@example.com\r\nBcc: x@evil.test": "control character",
    "victim@example.com\n": "control character",
    "vic\x00tim@example.com": "control character",
    "victim@example.com\x7f": "control character",
    "victim@example.com.": "not a valid address",  # a trailing dot is not an addr-spec
    "victim@example..com": "not a valid address",
    "victim@exa\u200dmple.com": "invalid domain",  # a joiner IDNA refuses
    "a" * 300 + "@example.com" + " " * 10: "longer than",
}


@pytest.mark.parametrize("text", SAME_MAILBOX)
def test_every_spelling_of_a_mailbox_has_one_normal_form(text: str):
    assert normalize_address(text) == VICTIM


def test_internationalised_domains_are_idna_encoded_and_case_folded():
    for text in ("victim@bücher.example", "victim@BÜCHER.Example", "victim@XN--BCHER-KVA.example"):
        assert normalize_address(text) == "victim@xn--bcher-kva.example"
    assert normalize_address("victim@straße.de") == "victim@xn--strae-oqa.de"  # IDNA 2008


def test_local_parts_are_lower_cased_and_quoted_only_when_needed():
    assert normalize_address('"Victim Person"@Example.com') == '"victim person"@example.com'
    assert normalize_address('"a\\"b"@example.com') == '"a\\"b"@example.com'
    assert normalize_address("José@example.com") == "josé@example.com"
    assert normalize_address("v@[192.0.2.1]") == "v@[192.0.2.1]"


@pytest.mark.parametrize(("text", "why"), REFUSED.items())
def test_what_is_not_exactly_one_mailbox_is_refused_with_the_reason(text: str, why: str):
    with pytest.raises(AddressError, match=why) as err:
        normalize_address(text)
    assert "\n" not in str(err.value)  # one line
    assert "\r" not in str(err.value)


async def test_normalize_each_keeps_order_and_reports_each_refusal():
    texts = ["<a@example.com>", "b@example.com, c@example.com", "C@Example.com"]
    found = await normalize_each(texts)
    assert found[0] == "a@example.com"
    assert isinstance(found[1], AddressError)
    assert found[2] == "c@example.com"
    # Many that need the full parser go to a thread: the same answers.
    many = [f"Name {i} <user{i}@Example.com>" for i in range(50)]
    assert await normalize_each(many) == [f"user{i}@example.com" for i in range(50)]


_ATEXT = st.sampled_from("abcXYZ019!#$%&'*+/=?^_`{|}~-")
_PIECES = st.sampled_from(
    [
        "a",
        "Z",
        "0",
        ".",
        "@",
        "<",
        ">",
        '"',
        "(",
        ")",
        "\\",
        ",",
        ";",
        ":",
        " ",
        "\t",
        "\r",
        "\n",
        "\x00",
        "[",
        "]",
        "-",
        "_",
        "+",
        "=?utf-8?q?x?=",
        "é",
        "Ü",
        "\uff45",
        "ß",
        "\u200d",
        "example",
        ".com",
        "xn--",
    ]
)
_TEXTS = st.one_of(
    st.text(max_size=80),
    st.lists(_PIECES, max_size=30).map("".join),
)
_LABEL = st.text(st.sampled_from("abcXYZ019-"), min_size=1, max_size=10)
_SIMPLE = st.builds(
    lambda local, labels: ".".join(local) + "@" + ".".join(labels),
    st.lists(st.text(_ATEXT, min_size=1, max_size=8), min_size=1, max_size=3),
    st.lists(_LABEL, min_size=1, max_size=3),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXTS)
def test_normalisation_is_idempotent_and_raises_only_address_error(text: str):
    try:
        normal = normalize_address(text)
    except AddressError:
        return
    assert normalize_address(normal) == normal
    assert len(normal) <= MAX_ADDRESS_CHARS + 100
    # What the SMTP client puts in RCPT TO is exactly the address suppressions were checked for.
    assert email.utils.parseaddr(normal)[1] == normal


@settings(max_examples=500, deadline=None)
@given(_SIMPLE, st.sampled_from(["{}", "<{}>", "Name <{}>", "{} (c)", '"N" <{}>']))
def test_the_fast_path_agrees_with_the_parser(address: str, form: str):
    try:
        slow = _normal(form.format(address))
    except AddressError:
        with pytest.raises(AddressError):
            _normal(address)
        return
    assert normalize_address(address) == slow == address.lower()
