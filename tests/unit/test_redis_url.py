"""Redis URLs: passwords never shown (``redact_url``), TLS options checked before the first
connection (``check_url``), Sentinel URLs with TLS and the sentinels' own credentials, and the
ACL rules the scheduler's user gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler_service.state import redis_acl
from scheduler_service.state.redis_conn import (_MasterSSLConnection, check_url, connect, parse_sentinel_url,
                                                redact_url)


@pytest.mark.parametrize("url, shown", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://accelgen:s3cret@10.0.0.1:6379/0", "redis://accelgen:***@10.0.0.1:6379/0"),
    ("redis://:s3cret@host/0", "redis://:***@host/0"),
    ("redis://s3cret@host/0", "redis://***@host/0"),  # a bare userinfo may be a password
    ("rediss://u:p%40ss@h:6380/0?ssl_ca_certs=/etc/ca.crt&ssl_password=kp",
     "rediss://u:***@h:6380/0?ssl_ca_certs=/etc/ca.crt&ssl_password=***"),
    ("redis+sentinel://accelgen:pw@10.0.0.1:26379,10.0.0.2:26379/accelgen/0?sentinel_password=sp&ssl=true",
     "redis+sentinel://accelgen:***@10.0.0.1:26379,10.0.0.2:26379/accelgen/0?sentinel_password=***&ssl=true"),
    ("redis://h/0?password=pw", "redis://h/0?password=***"),
])
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_check_url_refuses_tls_options_without_tls_and_unreadable_files(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    check_url("redis://accelgen:pw@h:6379/0")
    check_url(f"rediss://accelgen:pw@h:6380/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
    check_url(f"redis+sentinel://h:26379/accelgen/0?ssl=true&ssl_ca_certs={ca}")
    cases = {
        f"redis://accelgen:pw@h/0?ssl_ca_certs={ca}": "need a TLS URL",
        f"redis+sentinel://:pw@h:26379/accelgen?ssl_ca_certs={ca}": "ssl=true on a Sentinel URL",
        "rediss://accelgen:pw@h/0?ssl_ca_certs=/no/such/ca.crt": "does not exist",
        f"rediss://accelgen:pw@h/0?ssl_certfile={ca}": "both ssl_certfile and ssl_keyfile",
        "rediss://accelgen:pw@h/0?ssl_cert_reqs=maybe": "ssl_cert_reqs must be one of",
        "http://accelgen:pw@h/0": "the scheme must be one of",
        "redis+sentinel://:pw@h/accelgen": "expected HOST:PORT",
    }
    for url, why in cases.items():
        with pytest.raises(ValueError, match=why) as refused:
            check_url(url)
        assert ":pw@" not in str(refused.value) and ":***@" in str(refused.value), refused.value


def test_a_sentinel_url_carries_tls_and_the_sentinels_own_user(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    url = (f"redis+sentinel://accelgen:pw@10.0.0.1:26379/accelgen/1?ssl=true&ssl_ca_certs={ca}"
           f"&ssl_check_hostname=false&sentinel_username=watcher&sentinel_password=sp")
    spec = parse_sentinel_url(url)
    assert (spec["username"], spec["password"], spec["db"]) == ("accelgen", "pw", 1)
    assert (spec["sentinel_username"], spec["sentinel_password"]) == ("watcher", "sp")
    assert spec["tls"] == {"ssl_ca_certs": str(ca), "ssl_check_hostname": False}
    assert parse_sentinel_url("redis+sentinel://h:1/s")["tls"] is None
    client = connect(url)  # nothing is dialled until a command
    pool = client.connection_pool
    assert pool.connection_class is _MasterSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca) and pool.connection_kwargs["password"] == "pw"
    sentinel_kwargs = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs["username"] == "watcher" and sentinel_kwargs["ssl_ca_certs"] == str(ca)


def test_the_scheduler_acl_rules_are_bounded_to_the_prefix() -> None:
    rules = redis_acl.scheduler_rules("accelgen:")
    assert rules.startswith("resetkeys ~accelgen:* resetchannels -@all ")
    assert "-@dangerous" in rules and "+@all" not in rules and "+config" not in rules
    line = redis_acl.user_line(["a", "b"], "accelgen:")
    assert line.startswith("user accelgen reset on >a >b resetkeys ~accelgen:*")
    assert "~*" in redis_acl.user_line(["a"], None)
    for bad in ("", "acc*", "a b"):
        with pytest.raises(ValueError):
            redis_acl.scheduler_rules(bad)
    with pytest.raises(ValueError):
        redis_acl.user_line(["has space"], "accelgen:")


@pytest.mark.parametrize("password", ["pa#ss", "p/a?s", "a@b#c"])
def test_a_password_with_reserved_characters_is_still_hidden(password: str) -> None:
    """Unescaped, "#", "?" and "/" end urlsplit's netloc early: the user part is what comes before
    the last "@", whatever it holds."""
    shown = redact_url(f"redis://accelgen:{password}@h:6379/0")
    assert shown == "redis://accelgen:***@h:6379/0"
