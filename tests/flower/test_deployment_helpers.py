"""The deployment's pure helpers, its test credentials and its process finder; no Flower run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.hazmat.primitives.serialization.ssh import load_ssh_public_key
from hypothesis import given, settings
from hypothesis import strategies as st

from codream_secure.flower.certificates import make_node_keys, make_test_certificates
from codream_secure.flower.deployment import (
    MARKER,
    LocalDeployment,
    app_pyproject,
    live_processes,
    node_config_arg,
    toml_value,
)

from .conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

try:
    from flwr.common.config import parse_config_args
except ImportError:  # the core runs without the `flower` extra
    parse_config_args = None

KEYS = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)
TEXT = st.text(st.characters(blacklist_characters="\"'\\\n\r", blacklist_categories=("Cs", "Cc")),
               max_size=20)
VALUES = st.one_of(st.booleans(), st.integers(-2**62, 2**62),
                   st.floats(allow_nan=False, allow_infinity=False), TEXT)


@settings(deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_run_config_survives_the_pyproject(config):
    parsed = tomllib.loads(app_pyproject("a.server:app", "a.client:app", config))
    assert parsed["tool"]["flwr"]["app"]["config"] == config
    assert parsed["tool"]["flwr"]["app"]["components"] == {"serverapp": "a.server:app",
                                                           "clientapp": "a.client:app"}


@pytest.mark.skipif(parse_config_args is None, reason="needs the `flower` extra")
@settings(deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_node_config_survives_flowers_own_parser(config):
    # Flower's own parser is the judge of what a SuperNode will see.
    assert parse_config_args([node_config_arg(config)]) == config


@pytest.mark.parametrize("value", ['a"b', "a'b", "a\\b", "a\nb"])
def test_values_flower_cannot_carry_are_refused(value):
    with pytest.raises(ValueError, match="quote, backslash or newline"):
        toml_value(value)


@pytest.mark.parametrize("key", ["a b", "a=b", "", "a.b"])
def test_keys_flower_cannot_carry_are_refused(key):
    with pytest.raises(ValueError, match="must be letters"):
        node_config_arg({key: 1})


def test_supernode_auth_without_tls_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs TLS"):
        LocalDeployment(tmp_path, num_supernodes=1, supernode_auth=True)


def test_the_package_imports_no_flwr():
    code = ("import sys, codream_secure.flower, codream_secure.flower.deployment, "
            "codream_secure.flower.certificates; assert 'flwr' not in sys.modules, 'flwr'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_server_certificate_is_issued_by_the_ca_for_loopback(tmp_path):
    files = make_test_certificates(tmp_path, hosts=("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    assert files.server_key.stat().st_mode & 0o077 == 0
    other = make_test_certificates(tmp_path / "other")
    with pytest.raises(InvalidSignature):  # same CA name, another key
        server.verify_directly_issued_by(
            x509.load_pem_x509_certificate(other.ca_certificate.read_bytes()))


def test_node_keys_are_a_p384_openssh_pair(tmp_path):
    keys = make_node_keys(tmp_path, "node")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key() == public
    assert keys.private_key.stat().st_mode & 0o077 == 0


def test_live_processes_finds_a_marked_process_until_it_dies():
    sleeper = subprocess.Popen(["sleep", "60"], env={**os.environ, MARKER: "m-test"},
                               start_new_session=True)
    try:
        assert sleeper.pid in live_processes("m-test")
        assert sleeper.pid in live_processes(pgids=[sleeper.pid])
        assert sleeper.pid not in live_processes("another-marker")
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
    deadline = time.monotonic() + 5
    while live_processes("m-test") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live_processes("m-test", pids=[sleeper.pid], pgids=[sleeper.pid])


def test_a_whole_config_file_travels_in_the_apps_run_config():
    import tomllib

    text = '[codream]\ndream_mode = "generator"\n# a \'comment\' with a \\ backslash\n'
    declared = tomllib.loads(app_pyproject("a:b", "c:d", {"config": text, "deadline-work": 2.5}))
    assert declared["tool"]["flwr"]["app"]["config"] == {"config": text, "deadline-work": 2.5}
