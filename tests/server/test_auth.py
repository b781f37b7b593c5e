"""The auth matrix: no key, a wrong, malformed or revoked key → 401 on every route; another key's run, request
or files → 404 (or the path refusal) exactly as for ones that do not exist."""
import asyncio
import os

from _asgi import SFT, asgi, bearer, create_run, new_key, result, submit
from signalrl import wire
from signalrl.server import auth


def routes(run_id, request_id):
    body, ctype = wire.encode_body({"args": [SFT, "causal_lm", None], "kwargs": {}})
    return [
        ("GET", "/v1/info", {}, None, None),
        ("GET", "/v1/runs", {}, None, None),
        ("POST", "/v1/runs", {}, b'{"base_model": "signal-tiny", "config": {}}', wire.JSON),
        ("GET", f"/v1/runs/{run_id}", {}, None, None),
        ("GET", f"/v1/runs/{run_id}/queue_stats", {}, None, None),
        ("GET", f"/v1/runs/{run_id}/metrics", {}, None, None),
        ("GET", f"/v1/runs/{run_id}/checkpoints", {}, None, None),
        ("POST", f"/v1/runs/{run_id}/requests", {"op": "forward", "client_id": "x", "seq": 1}, body, ctype),
        ("GET", f"/v1/requests/{request_id}", {}, None, None),
    ]


async def call(http, method, path, params, body, ctype, headers):
    h = dict(headers)
    if ctype:
        h["content-type"] = ctype
    return await http.request(method, path, params=params, content=body, headers=h)


def test_auth_matrix(service):
    async def main():
        async with asgi(service) as http:
            alice, bob = new_key(service, "alice"), new_key(service, "bob")
            revoked_id, revoked = auth.create_key(service.store, "old")
            assert service.store.revoke_key(revoked_id)
            run_a = await create_run(http, alice, lora_r=4)
            r = await submit(http, alice, run_a, "forward", SFT, "causal_lm", wait=20)
            rid = r.json()["request_id"]
            assert r.json()["status"] == "done"
            await submit(http, alice, run_a, "save_state", "mine", seq=2, wait=20)

            bad_headers = [{}, {"authorization": "Bearer"}, {"authorization": "Basic " + alice},
                           bearer("sk-signal-000000000000.nope-nope-nope-nope-nope"), bearer(alice + "x"),
                           bearer(alice[:-1]), bearer(revoked)]
            for method, path, params, body, ctype in routes(run_a, rid):
                for headers in bad_headers:
                    r = await call(http, method, path, params, body, ctype, headers)
                    assert r.status_code == 401, (path, headers, r.text)
                    assert r.json()["error"]["type"] == "SignalAuthError"
                    assert r.headers["www-authenticate"] == "Bearer"

            # Bob: 404 on every route of Alice's run, with the document a run that does not exist gets.
            for (method, path, params, body, ctype), (_, ghost_path, *_rest) in zip(
                    routes(run_a, rid), routes("run-000000000000", "req-" + "0" * 32)):
                if path in ("/v1/info", "/v1/runs"):
                    continue
                r = await call(http, method, path, params, body, ctype, bearer(bob))
                ghost = await call(http, method, ghost_path, params, body, ctype, bearer(bob))
                assert r.status_code == ghost.status_code == 404, (path, r.text)
                norm = r.text.replace(run_a, "ID").replace(rid, "ID")
                assert norm == ghost.text.replace("run-000000000000", "ID").replace("req-" + "0" * 32, "ID")
                assert "alice" not in r.text  # the id Bob named is echoed, as for any unknown id; nothing else
            runs = (await http.get("/v1/runs", headers=bearer(bob))).json()["runs"]
            assert runs == []
            assert [x["run_id"] for x in (await http.get("/v1/runs", headers=bearer(alice))).json()["runs"]] == [run_a]

            # Bob's own run cannot reach Alice's files by path: the same refusal as for a path that does not exist.
            run_b = await create_run(http, bob, lora_r=4)
            a_dir = os.path.join(service.runs_dir, run_a)
            refusals = []
            for target in (os.path.join(a_dir, "checkpoints", "mine"), os.path.join(a_dir, "checkpoints", "nothing")):
                r = await submit(http, bob, run_b, "load_state", target, seq=len(refusals) + 1, wait=20)
                doc = r.json()
                assert doc["status"] == "failed" and doc["error"]["type"] == "ValueError"
                refusals.append(doc["error"]["message"].replace(target, "P"))
            assert refusals[0] == refusals[1] and "not a path this API key may use" in refusals[0]
            r = await submit(http, bob, run_b, "export_model", os.path.join(a_dir, "stolen"), seq=3, wait=20)
            assert r.json()["error"]["type"] == "ValueError" and not os.path.exists(os.path.join(a_dir, "stolen"))
            # Alice may load her own checkpoint by its absolute path, and export inside her workspace.
            r = await submit(http, alice, run_a, "load_state", os.path.join(a_dir, "checkpoints", "mine"), seq=3,
                             wait=20)
            assert r.json()["status"] == "done", r.text
            r = await submit(http, alice, run_a, "export_model", "exports/m", seq=4, wait=20)
            path = r.json()["result"]
            assert path.startswith(os.path.join(service.root, "files", auth.verify(service.store, alice))) and os.path.isdir(path)
            # ... and create a run on that export; Bob may not.
            ok = await http.post("/v1/runs", params={"wait": 20}, headers={**bearer(alice), "content-type": wire.JSON},
                                 content=f'{{"base_model": "{path}", "config": {{"lora_r": 0}}}}')
            assert ok.json()["status"] == "done", ok.text
            no = await http.post("/v1/runs", params={"wait": 20}, headers={**bearer(bob), "content-type": wire.JSON},
                                 content=f'{{"base_model": "{path}", "config": {{"lora_r": 0}}}}')
            assert no.json()["status"] == "failed" and "base_model: could not load" in no.json()["error"]["message"]
            # A request id of Alice's is Bob's 404, and stays Alice's.
            assert (await http.get(f"/v1/requests/{rid}", headers=bearer(bob))).status_code == 404
            assert (await result(http, alice, rid))["status"] == "done"

    asyncio.run(main())


def test_revoked_key_stops_at_once(service):
    async def main():
        async with asgi(service) as http:
            key_id, key = auth.create_key(service.store, "soon-revoked")
            run_id = await create_run(http, key, lora_r=4)
            assert (await http.get(f"/v1/runs/{run_id}", headers=bearer(key))).status_code == 200
            from signalrl.server.cli import keys
            assert keys(["revoke", key, "--root", service.root]) == 0
            assert (await http.get(f"/v1/runs/{run_id}", headers=bearer(key))).status_code == 401

    asyncio.run(main())
