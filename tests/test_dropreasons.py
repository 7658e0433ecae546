"""Drop reason names come from the running kernel, never from a table in our code."""

from pathlib import Path

import pytest

from netwatchd.kernel import dropreasons

FORMAT = '''print fmt: "reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" },
 { 12, "NETFILTER_DROP" })'''


def test_parse_format_file():
    assert dropreasons.parse_format_file(FORMAT) == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP"}


def test_btf_fallback_strips_prefix(tmp_path):
    class FakeBtf:
        def enum_values(self, name):
            assert name == "skb_drop_reason"
            return {"SKB_NOT_DROPPED_YET": 0, "SKB_CONSUMED": 1, "SKB_DROP_REASON_NO_SOCKET": 3}

    r = dropreasons.load(tmp_path, FakeBtf())  # no format file under tmp_path
    assert r.name(3) == "NO_SOCKET" and r.name(99) == "UNKNOWN_99" and r.source.startswith("btf")


def test_no_source_is_an_error(tmp_path):
    with pytest.raises(LookupError, match="no drop reason names"):
        dropreasons.load(tmp_path, None)


def test_running_kernel_names_match_btf():
    """Both sources agree on this kernel: the numbers we export mean what the kernel means."""
    from netwatchd.kernel.btf import Btf

    tracefs = Path("/sys/kernel/tracing")
    if not (tracefs / "events/skb/kfree_skb/format").exists():
        pytest.skip("tracefs not mounted")
    from_fmt = dropreasons.load(tracefs)
    from_btf = dropreasons.from_btf_enum(Btf.load().enum_values("skb_drop_reason"))
    assert from_fmt.number("NO_SOCKET") is not None
    for num, name in from_fmt.items():
        assert from_btf[num] == name
