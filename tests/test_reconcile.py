"""Reconciling expired operations: a resume asks a function, given the operation and the
client, whether the API acted on each expired one; it is completed, reissued and sent, or
left expired, and each decision is journaled with who decided and when."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import idemclient
from idemclient import Journal, Operation, ResponseNotKeptError, RetryPolicy

from .fakes import AnswerLostOnce
from .test_cli import cli
from .test_journal import Clock


class API:
    """A payments API that can be asked about a charge by its reference (`metadata`), and
    that loses the answers of the first POST of the references in `lose`."""

    def __init__(self, lose: set[str], acts: set[str]) -> None:
        self.lose, self.acts = lose, acts  # acts: which lost POSTs it acted on anyway
        self.charges: dict[str, dict[str, Any]] = {}
        self.posts: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            ref = request.url.params["ref"]
            if ref == "broken":
                return httpx.Response(503)
            found = self.charges.get(ref)
            return httpx.Response(200, json=found) if found else httpx.Response(404)
        ref = json.loads(request.content)["ref"]
        self.posts.append(ref)
        if ref in self.lose:
            self.lose.discard(ref)
            if ref in self.acts:
                self.charges[ref] = {"id": f"ch_{ref}", "ref": ref}
            raise httpx.ReadTimeout("the answer was lost", request=request)
        self.charges[ref] = {"id": f"ch_{ref}", "ref": ref}
        return httpx.Response(201, json=self.charges[ref])


def check(op: Operation, client: httpx.Client) -> Any:
    """Ask the API about the charge by the reference in its body."""
    ref = json.loads(client.journal.stored_request(op.key)[3])["ref"]  # type: ignore[attr-defined]
    if ref == "raises":
        raise RuntimeError("the lookup itself failed")
    found = client.get("/charges", params={"ref": ref})
    if found.status_code == 200:
        return found
    return "not_happened" if found.status_code == 404 else "unknown"


REFS = ["acted", "missed", "broken", "raises"]


def lost_batch(path: Path, clock: Clock, api: API) -> idemclient.Client:
    journal = Journal(path, clock=clock, auto_purge=None)
    client = idemclient.Client(
        base_url="https://pay.example", journal=journal, transport=httpx.MockTransport(api),
        retry=RetryPolicy(max_attempts=1),
    )  # fmt: skip
    for ref in REFS:
        lost = ref in api.lose
        with idemclient.operation(f"charge-{ref}"):
            try:
                client.post("/charges", json={"ref": ref})
            except idemclient.RetriesExhaustedError:
                assert lost
            else:
                assert not lost
    clock.now += 25 * 3600  # past the retention: the server may have forgotten the keys
    return client


def test_a_resume_reconciles_expired_operations_and_journals_each_decision(
    journal_path: Path,
) -> None:
    clock = Clock()
    api = API(lose=set(REFS), acts={"acted"})
    with contextlib.closing(lost_batch(journal_path, clock, api)) as client:
        report = client.resume_pending(reconcile=check)
        outcomes = [(r.operation.name, r.outcome) for r in report]
        assert outcomes == [
            ("charge-acted", "reconciled"), ("charge-missed", "reissued"),
            ("charge-broken", "expired"), ("charge-raises", "expired"),
            ("charge-missed", "completed"),  # reissued, then sent by this resume
        ]  # fmt: skip
        assert isinstance(report[3].error, RuntimeError)
        assert api.posts == [*REFS, "missed"]  # one more POST, of the one that never happened
        with idemclient.operation("charge-acted"):  # a rerun replays what the check found
            again = client.post("/charges", json={"ref": "acted"})
        assert again.json() == {"id": "ch_acted", "ref": "acted"}
        assert again.extensions["idempotency"]["replayed"] is True
        journal = client.journal
        trail = {ref: journal.decisions(f"charge-{ref}") for ref in REFS}
        by = "tests.test_reconcile.check"
        assert [(v.verdict, v.decided_by) for v in trail["acted"]] == [("happened", by)]
        assert [v.verdict for v in trail["missed"]] == ["not_happened"]
        assert trail["missed"][0].key != journal.get("charge-missed").key  # type: ignore[union-attr]
        assert [v.verdict for v in trail["broken"]] == ["unknown"]
        assert [(v.verdict, v.detail) for v in trail["raises"]] == [
            ("error", "RuntimeError: the lookup itself failed")
        ]
        states = {op.name: op.state for op in journal.operations()}
        assert states == {"charge-acted": "completed", "charge-missed": "completed",
                          "charge-broken": "expired", "charge-raises": "expired"}  # fmt: skip
        # asked again next time: what is still expired
        report = client.resume_pending(reconcile=lambda op, c: "unknown")
        assert [(r.operation.name, r.outcome) for r in report] == [
            ("charge-broken", "expired"), ("charge-raises", "expired"),
        ]  # fmt: skip


def test_happened_without_an_answer_is_completed_and_never_sent_again(journal_path: Path) -> None:
    clock = Clock()
    api = API(lose={"acted"}, acts={"acted"})
    with contextlib.closing(lost_batch(journal_path, clock, api)) as client:
        report = client.resume_pending(reconcile=lambda op, c: "happened")
        assert [r.outcome for r in report if r.operation.name == "charge-acted"] == ["reconciled"]
        with idemclient.operation("charge-acted"), pytest.raises(ResponseNotKeptError) as caught:
            client.post("/charges", json={"ref": "acted"})
        assert "<lambda> found that it happened): nothing was sent" in str(caught.value)
        assert api.posts.count("acted") == 1


@pytest.mark.anyio
async def test_an_async_resume_takes_an_async_reconcile_function(journal_path: Path) -> None:
    clock = Clock()
    api = API(lose={"acted", "missed"}, acts={"acted"})
    lost_batch(journal_path, clock, api).close()

    async def acheck(op: Operation, client: httpx.AsyncClient) -> Any:
        name = op.name or ""
        found = await client.get("/charges", params={"ref": name.removeprefix("charge-")})
        return found if found.status_code == 200 else "not_happened"

    journal = Journal(journal_path, clock=clock, auto_purge=None)
    async with idemclient.AsyncClient(
        base_url="https://pay.example", journal=journal, transport=httpx.MockTransport(api)
    ) as client:
        report = await client.aresume_pending(reconcile=acheck)
    outcomes = {(r.operation.name, r.outcome) for r in report}
    assert ("charge-acted", "reconciled") in outcomes
    assert ("charge-missed", "reissued") in outcomes
    assert ("charge-missed", "completed") in outcomes
    assert journal.decisions("charge-acted")[0].decided_by.endswith("acheck")
    journal.close()


def test_the_cli_reconciles_with_a_function_named_module_colon_function(
    journal_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    api = API(lose={"acted", "missed"}, acts={"acted"})
    lost_batch(journal_path, clock, api).close()
    with Journal(journal_path, clock=clock, auto_purge=None) as journal:
        assert len(journal.expire_stale()) == 2  # the CLI runs on today's clock
    module = tmp_path / "billing_checks.py"
    module.write_text(
        "def found(op, client):\n"
        "    return 'happened' if op.name == 'charge-acted' else 'unknown'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for bad, says in (("billing_checks", "module:function"), ("nowhere:found", "nowhere"),
                      ("billing_checks:missing", "'missing'")):  # fmt: skip
        code, _, err = cli("--journal", str(journal_path), "reconcile", "--with", bad)
        assert code == 2
        assert says in err
    code, out, err = cli("--journal", str(journal_path), "reconcile", "--with",
                         "billing_checks:found")  # fmt: skip
    assert code == 1, err  # one is still expired
    assert "charge-acted: happened (billing_checks.found): completed" in out
    assert "charge-missed: unknown (billing_checks.found): still expired" in out
    code, out, err = cli("--journal", str(journal_path), "show", "charge-acted")
    assert code == 0, err
    assert "happened by billing_checks.found" in out
    code, out, err = cli("--journal", str(journal_path), "show", "charge-missed", "--json")
    assert [d["verdict"] for d in json.loads(out)["decisions"]] == ["unknown"]


def test_the_callers_retry_of_an_operation_reissued_meanwhile_is_not_a_new_operation(
    journal_path: Path,
) -> None:
    """An unnamed call fails (its answer lost), and a day later a person reissues it; the
    caller, in the same thread, then makes the same call again. It is that operation, which
    gave its key up: refused, nothing sent, and the resume sends it once under its new key.
    (It went out under the old key, a new operation to a server that had forgotten it, and
    the resume then sent the reissued one: the charge made twice.)"""
    clock = Clock()
    api = AnswerLostOnce({"id": "ch_1"})
    keys = api.keys
    journal = Journal(journal_path, clock=clock, auto_purge=None)
    with idemclient.Client(
        base_url="https://pay.example", journal=journal, transport=httpx.MockTransport(api),
        retry=RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip
        with pytest.raises(idemclient.RetriesExhaustedError):
            client.post("/charges", json={"ref": "r1"})
        clock.now += 25 * 3600
        (expired,) = journal.expire_stale()
        reissued = journal.reissue(expired.key)
        with pytest.raises(idemclient.OperationMismatchError, match="given up"):
            client.post("/charges", json={"ref": "r1"})
        assert keys == [expired.key]
        report = client.resume_pending()
        assert [r.outcome for r in report] == ["completed"]
        assert keys == [expired.key, reissued.key]
