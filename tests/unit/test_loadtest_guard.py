"""The load test only ever targets loopback and is bounded."""

import pytest

from tools.loadtest import check_loopback, parse_args


@pytest.mark.parametrize("address", ["127.0.0.1:50053", "127.8.9.10:1", "localhost:5", "[::1]:9"])
def test_loopback_targets_are_allowed(address):
    check_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.5:50053", "192.168.1.2:80", "8.8.8.8:53",
                                     "example.com:443", "0.0.0.0:50053"])
def test_other_targets_are_refused(address):
    with pytest.raises(ValueError, match="only loopback targets"):
        check_loopback(address)


def test_unbounded_runs_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--duration-s", "3600"])
