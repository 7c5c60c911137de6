"""Prepared view calls (chain/views.py, `ChainClient.read`): web3's answers, fresh every read, batched over HTTP.

The HTTP tests put the embedded EVM behind a real local JSON-RPC server (single and batch requests, as a node
answers them), so the batched path runs against real contract state; its `mangle` hook plays a node that
answers wrongly.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from web3 import Web3

from medtwin.chain import ChainSession, RunRegistration, build_round_anchor, open_session, run_key
from medtwin.chain.client import SESSION_CONSTANT_REQUESTS
from medtwin.chain.errors import ChainError, ChainRevertError, ChainUnavailableError
from medtwin.chain.views import ViewFunctions
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig
from medtwin.experiments.chain_wiring import ChainProvenance

RUN = "run-views"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def session() -> ChainSession:
    opened = open_session(ChainConfig(name="embedded"))
    for site_id in ("hosp0", "hosp1", "hosp2"):
        account = opened.site_account(site_id)
        opened.auth.register_site(site_id=site_id, address=account.address, key_fingerprint=h(site_id))
        if site_id != "hosp2":
            opened.auth.approve_run(site=account, run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    opened.data.register_run(RunRegistration(RUN, "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    return opened


Mangle = Callable[[dict[str, Any]], dict[str, Any]]


@contextmanager
def over_http(session: ChainSession, chain: str, mangle: Mangle | None = None) -> Iterator[list[int]]:
    """Serve one embedded chain over HTTP JSON-RPC and point its client there; yields the sizes of the
    requests received (1 for a single request, n for a batch of n)."""
    w3 = getattr(session, chain).client.w3
    backend = w3.provider
    node_account = w3.eth.accounts[0]
    sizes: list[int] = []

    class Node(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 — http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests_ = body if isinstance(body, list) else [body]
            sizes.append(len(requests_))
            answers = []
            for request in requests_:
                if request["method"] == "eth_call":  # as web3 fills it in for eth-tester (a node needs none)
                    request["params"][0].setdefault("from", node_account)
                answer = backend.make_request(request["method"], request["params"])
                answer = {"jsonrpc": "2.0", "id": request["id"], **{k: v for k, v in answer.items() if k in ("result", "error")}}
                answers.append(mangle(answer) if mangle else answer)
            payload = json.dumps(answers if isinstance(body, list) else answers[0], default=_hex).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Node)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    w3.provider = Web3.HTTPProvider(  # as ChainClient.http opens it
        f"http://127.0.0.1:{server.server_address[1]}", exception_retry_configuration=None,
        cache_allowed_requests=True, cacheable_requests=SESSION_CONSTANT_REQUESTS,
    )  # fmt: skip
    try:
        yield sizes
    finally:
        w3.provider = backend
        server.shutdown()
        server.server_close()


def _plain(value: object) -> object:
    """Lists and tuples alike (web3 and eth_abi differ only there)."""
    return tuple(_plain(item) for item in value) if isinstance(value, (list, tuple)) else value


def _hex(value: object) -> str:
    return "0x" + bytes(value).hex()  # type: ignore[arg-type]


def test_prepared_reads_answer_what_web3_answers(session: ChainSession, tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    anchor, _ = build_round_anchor(
        store, run_id=RUN, round_index=1, update_digests={"hosp0": store.put(b"update", kind="update")},
        aggregate_digest=store.put(b"aggregate", kind="aggregate"), epsilon_by_site={"hosp0": 0.5}, he_error_bound=1e-6,
    )  # fmt: skip
    session.data.anchor_round(anchor)
    address = session.auth.site_address("hosp0")
    for gateway, method, args in (
        (session.auth, "approvals", (address, run_key(RUN))),
        (session.auth, "is_admitted", (address, run_key(RUN))),
        (session.auth, "sites", (address,)),  # a struct holding bytes, a string and integers
        (session.auth, "site_address", (bytes.fromhex(hashlib.sha256(b"medtwin.site:hosp0").hexdigest()),)),  # an address
        (session.data, "anchors", (run_key(RUN), 1)),
        (session.data, "anchors", (run_key(RUN), 2)),  # not anchored: zeros
    ):
        assert _plain(gateway.read(method, *args)) == _plain(gateway.call(method, *args)), method
    assert session.data.anchor(RUN, 1) is not None and session.data.anchor(RUN, 1).aggregate_hash == anchor.aggregate_hash


def test_calldata_is_built_once_per_arguments_and_answers_are_read_every_time(session: ChainSession) -> None:
    views = ViewFunctions(session.auth.address, session.auth.contract.abi, max_cached_calldata=2)
    address = session.auth.site_address("hosp1")
    first = views.call("is_admitted", address, run_key(RUN))
    assert first.data == session.auth.contract.encode_abi("is_admitted", [address, run_key(RUN)])
    assert views.call("is_admitted", address, run_key(RUN)).data is first.data  # kept, not encoded again
    assert session.auth.client.read([first], what="is_admitted") == [True]
    account = session.site_account("hosp1")
    session.auth.withdraw_approval(site=account, run_id=RUN)
    assert session.auth.client.read([first], what="is_admitted") == [False]  # the same calldata, a fresh answer
    for index in range(3):  # past the bound the cache starts over instead of growing
        views.call("is_admitted", address, run_key(f"run-{index}"))
    assert len(views._calldata) <= 2
    with pytest.raises(ChainError, match="do not encode"):
        views.call("is_admitted", address, "not bytes32")
    with pytest.raises(ChainError, match="0 view functions named 'no_such'"):
        views.call("no_such", address)


def test_admissions_of_a_round_are_one_batch_and_follow_a_revocation(session: ChainSession, tmp_path) -> None:
    provenance = ChainProvenance(session=session, artifacts_root=tmp_path / "artifacts")
    sites = ["hosp0", "hosp2", "hosp9", "hosp0"]
    with over_http(session, "auth") as sizes:
        first = provenance.admission_problems(site_ids=sites, run_id=RUN)  # registrations read here, once
        sizes.clear()
        again = provenance.admission_problems(site_ids=sites, run_id=RUN)
        # the unregistered site's address (it may register later: read every time), then one batch of
        # is_admitted for the two registered sites; their registrations are not read again
        assert sizes == [1, 2]
    assert first == again and list(again) == ["hosp0", "hosp2", "hosp9"]
    assert again["hosp0"] is None
    assert "revoked or has not approved" in (again["hosp2"] or "")
    assert "not registered" in (again["hosp9"] or "")

    fresh = open_session(ChainConfig(name="embedded"))  # a chain of its own: the revocation stays out of `session`
    for site_id in ("a", "b"):
        fresh.auth.register_site(site_id=site_id, address=fresh.site_account(site_id).address, key_fingerprint=h(site_id))
        fresh.auth.approve_run(site=fresh.site_account(site_id), run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    coordinator = ChainProvenance(session=fresh, artifacts_root=tmp_path / "fresh")
    with over_http(fresh, "auth"):
        assert coordinator.admission_problems(site_ids=["a", "b"], run_id=RUN) == {"a": None, "b": None}
    fresh.auth.revoke_site(site_id="b", reason="stolen key")  # written in-process (the test node only serves reads)
    with over_http(fresh, "auth"):
        after = coordinator.admission_problems(site_ids=["a", "b"], run_id=RUN)
    assert after["a"] is None and "revoked" in (after["b"] or "")


def test_a_site_check_and_an_anchor_read_over_http_are_one_request_each(session: ChainSession) -> None:
    with over_http(session, "auth") as auth_sizes, over_http(session, "data") as data_sizes:
        session.auth.site_address("hosp0")  # registration: read once per session
        auth_sizes.clear()
        approval, admitted = session.auth.approval_and_admission(site_id="hosp0", run_id=RUN)
        assert session.data.anchor(RUN, 99) is None
    assert admitted and approval is not None and approval.config_hash == h("c")
    assert auth_sizes == [2] and data_sizes == [1]


@pytest.mark.parametrize(
    ("mangle", "error", "match"),
    [
        (lambda answer: {"jsonrpc": "2.0", "id": answer["id"], "result": "0x12"}, ChainUnavailableError, "do not decode"),
        (lambda answer: {"jsonrpc": "2.0", "id": answer["id"], "result": "0xzz"}, ChainUnavailableError, "non-hex"),
        (lambda answer: {"jsonrpc": "2.0", "id": answer["id"], "result": 7}, ChainUnavailableError, "got no result"),
        (lambda answer: {"jsonrpc": "2.0", "id": answer["id"]}, ChainUnavailableError, "got no result"),
        (lambda answer: {"jsonrpc": "2.0", "id": "x", "result": "0x"}, ChainUnavailableError, "unreadable answer|do not decode"),
        (lambda answer: {"jsonrpc": "2.0", "id": answer["id"], "error": {"code": 3, "message": "execution reverted: no"}}, ChainRevertError, "no"),
    ],
)
def test_a_node_answering_wrongly_is_an_error_never_an_answer(session: ChainSession, mangle: Mangle, error: type, match: str) -> None:
    session.auth.site_address("hosp0")  # registration: read once, before the node goes wrong

    def eth_call_answers_mangled(answer: dict[str, Any]) -> dict[str, Any]:
        return mangle(answer) if len(str(answer.get("result", ""))) > 60 else answer  # eth_call answers are >= 32 bytes

    with over_http(session, "auth", mangle=eth_call_answers_mangled):
        with pytest.raises(error, match=match):
            session.auth.approval_and_admission(site_id="hosp0", run_id=RUN)
        with pytest.raises(error, match=match):
            session.auth.admissions(site_ids=["hosp0"], run_id=RUN)
