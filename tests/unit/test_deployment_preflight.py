"""Misconfigured parties are stopped before any process starts, within seconds, by a message that names
the file or flag and the fix: certificates that expired, are not yet valid or come from another CA; a
missing or invalid site file; a kit that never joined; an unreachable SuperLink; a port in use."""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from medtwin.core.identity import init_site_identity, join_federation, provision_federation
from medtwin.experiments.deployment import CoordinatorProcess, DeploymentError, SiteProcess


@pytest.fixture
def federation(tmp_path: Path) -> tuple[Path, Path]:
    """(admin dir, site file of a joined site 'alpha')."""
    kit = tmp_path / "alpha" / "kit"
    admin = provision_federation(tmp_path / "admin", federation_name="preflight", site_public_files=[init_site_identity(kit, site_id="alpha")])
    join_federation(kit, admin.manifest_path)
    site_file = tmp_path / "alpha" / "site.yaml"
    site_file.write_text(yaml.safe_dump({
        "site_id": "alpha", "data": {"builtin": {"task": "breast_cancer", "index": 0, "num_sites": 2}},
        "accept": {"tasks": ["breast_cancer"]}, "privacy": {"max_epsilon": 3.0, "max_delta": 1e-4},
        "kit_dir": str(kit), "state_dir": str(tmp_path / "alpha" / "state"),
    }))  # fmt: skip
    return admin.root, site_file


def _certificate(path: Path, *, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, days: tuple[int, int]) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0])).not_valid_after(now + dt.timedelta(days=days[1]))
        .sign(issuer_key, hashes.SHA256())
    )  # fmt: skip
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _coordinator_keys(admin: Path) -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey, x509.Name]:
    load = lambda p: serialization.load_pem_private_key(p.read_bytes(), password=None)  # noqa: E731
    ca = x509.load_pem_x509_certificate((admin / "ca" / "ca_cert.pem").read_bytes())
    return load(admin / "coordinator" / "tls_key.pem"), load(admin / "ca" / "ca_key.pem"), ca.subject


@pytest.mark.parametrize(
    ("signed_by", "days", "message"),
    [("ca", (-30, -1), "expired on"), ("ca", (2, 30), "not valid before"), ("itself", (-1, 30), "not signed by the federation CA")],
)
def test_a_bad_coordinator_certificate_stops_the_start_naming_the_file(
    federation: tuple[Path, Path], tmp_path: Path, signed_by: str, days: tuple[int, int], message: str
) -> None:
    admin, _ = federation
    tls_key, ca_key, ca_name = _coordinator_keys(admin)
    issuer_key, issuer = (ca_key, ca_name) if signed_by == "ca" else (tls_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    certificate = admin / "coordinator" / "tls_cert.pem"
    _certificate(certificate, key=tls_key, issuer_key=issuer_key, issuer=issuer, days=days)
    coordinator = CoordinatorProcess(admin, tmp_path / "coordinator")
    with pytest.raises(DeploymentError, match=message) as refused:
        coordinator.start()
    assert str(certificate) in str(refused.value) and "medtwin federation init" in str(refused.value)
    assert coordinator.pid is None and not coordinator.pidfile.exists()  # nothing was started


def test_a_site_with_a_bad_file_kit_address_or_port_is_told_which_within_seconds(federation: tuple[Path, Path], tmp_path: Path) -> None:
    _, site_file = federation
    with pytest.raises(DeploymentError, match="--site-file .* does not exist"):
        SiteProcess(tmp_path / "nowhere.yaml", "127.0.0.1:9").check()
    broken = tmp_path / "broken.yaml"
    broken.write_text(site_file.read_text().replace("max_epsilon: 3.0", "max_epsilon: lots"))
    with pytest.raises(DeploymentError, match="max_epsilon"):
        SiteProcess(broken, "127.0.0.1:9").check()

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(DeploymentError, match="cannot reach the SuperLink at --superlink .* is the coordinator running"):
        SiteProcess(site_file, address).check()
    assert time.monotonic() - started < 5

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        superlink = f"127.0.0.1:{listener.getsockname()[1]}"  # "reachable"
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            with pytest.raises(DeploymentError, match=r"\(--port\) is not free"):
                SiteProcess(site_file, superlink, port=busy.getsockname()[1]).check()
        kit = Path(yaml.safe_load(site_file.read_text())["kit_dir"])
        (kit / "ca_cert.pem").unlink()  # never joined
        with pytest.raises(DeploymentError, match="medtwin site join"):
            SiteProcess(site_file, superlink).check()


@pytest.mark.slow  # starts (and stops, by PID) two anvil nodes
def test_a_run_whose_chains_do_not_answer_is_not_submitted(tmp_path: Path) -> None:
    from medtwin.chain import chain_up, chain_down
    from medtwin.core.config import compose_config, config_to_yaml
    from medtwin.experiments.cli_deploy import submit_proposal

    state = tmp_path / "chain"
    config = compose_config(["chain=anvil", f"chain.state_dir={state}", f"runs_dir={tmp_path / 'runs'}", "run_id=needs-chains"])
    proposal = tmp_path / "proposal.yaml"
    proposal.write_text(config_to_yaml(config))
    with pytest.raises(DeploymentError, match="holds no deployment.json: start the chains first"):
        submit_proposal(proposal, coordinator_state=tmp_path / "coordinator", public_context=None, timeout_s=10)
    chain_up(config.chain, state)
    chain_down(state)  # deployed, then stopped: deployment.json names nodes that do not answer
    started = time.monotonic()
    with pytest.raises(DeploymentError, match=r"the auth chain at http://127\.0\.0\.1:\d+ .* does not answer: start it"):
        submit_proposal(proposal, coordinator_state=tmp_path / "coordinator", public_context=None, timeout_s=10)
    assert time.monotonic() - started < 15


def test_waiting_for_a_run_names_the_connection_when_it_is_missing_or_its_superlink_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The researcher's wait asks the Control API in-process: a connection FLWR_HOME does not define, or a SuperLink
    that does not answer, is a DeploymentError naming the connection within seconds, and FLWR_HOME is left as it was."""
    from medtwin.experiments.deployment import wait_for_run

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "medtwin-coordinator"\n\n[superlink.medtwin-coordinator]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "researcher-home"))
    with pytest.raises(DeploymentError, match=f"no Flower connection 'elsewhere' in FLWR_HOME {tmp_path}"):
        wait_for_run(tmp_path, "elsewhere", 7, timeout_s=30)
    started = time.monotonic()
    with pytest.raises(DeploymentError, match="connection 'medtwin-coordinator' gave no status for run 7"):
        wait_for_run(tmp_path, "medtwin-coordinator", 7, timeout_s=30)
    assert time.monotonic() - started < 20
    assert os.environ["FLWR_HOME"] == str(tmp_path / "researcher-home")
