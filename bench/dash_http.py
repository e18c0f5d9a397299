"""A small client for Dash's HTTP callback protocol, speaking it as the browser's renderer does.

It reads a page's ``end_id`` token from ``_dash-config``, the callbacks from
``/_dash-dependencies``, and POSTs ``/_dash-update-component`` payloads; background callbacks are
started and then polled with their signed ``cacheKey``/``job`` handles until they answer. A
``requests.Session`` keeps the server's cookies, so the server sees one browser per client.

Used by ``bench/load.py`` and ``tests/test_celery_integration.py``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import requests

_CONFIG = re.compile(r'<script id="_dash-config" type="application/json">(.*?)</script>', re.S)


class DashProtocolError(RuntimeError):
    """The server answered a callback with something other than Dash's protocol."""


def split_outputs(output: str) -> list[dict]:
    """``"..a.figure...b.data.."`` (or ``"a.figure"``) as ``[{"id", "property"}, ...]``."""
    parts = output[2:-2].split("...") if output.startswith("..") else [output]
    specs = []
    for part in parts:
        component, prop = part.rsplit(".", 1)
        specs.append({"id": component, "property": prop})
    return specs


@dataclass
class CallbackResult:
    """One answered callback: its HTTP status, the outputs it set, how long it took, and what it
    set elsewhere (``sideUpdate``: ``{id: {property: value}}``, e.g. the app-wide alert)."""

    status: int
    outputs: dict
    seconds: float
    side: dict = field(default_factory=dict)


class DashClient:
    """One simulated browser on a Dash app at ``base_url``."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 30.0, dependencies: list[dict] | None = None
    ):
        """``dependencies``: the app's callbacks when already read by another client."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.end_id: str | None = None
        self._dependencies = dependencies

    def open(self, path: str = "/") -> None:
        """Load a page as a browser would: its HTML (the end_id, the browser cookie)."""
        response = self.session.get(self.base_url + path, timeout=self.timeout_s)
        response.raise_for_status()
        match = _CONFIG.search(response.text)
        if not match:
            raise DashProtocolError(f"{path} has no _dash-config: is this a Dash app?")
        self.end_id = json.loads(match.group(1)).get("end_id")

    def dependencies(self) -> list[dict]:
        """Every server callback the app declares (``/_dash-dependencies``)."""
        if self._dependencies is None:
            response = self.session.get(
                self.base_url + "/_dash-dependencies", timeout=self.timeout_s
            )
            response.raise_for_status()
            self._dependencies = [d for d in response.json() if not d.get("clientside_function")]
        return self._dependencies

    def find(self, output: str, trigger: str | None = None) -> dict:
        """The callback whose output names ``output`` (``"id.prop"``), triggered by ``trigger``."""
        found = [
            d
            for d in self.dependencies()
            if any(f"{o['id']}.{o['property'].split('@')[0]}" == output for o in _outputs(d))
            and (trigger is None or any(_name(i) == trigger for i in d["inputs"]))
        ]
        if len(found) != 1:
            raise DashProtocolError(
                f"{len(found)} callbacks write {output}"
                + (f" on {trigger}" if trigger else "")
                + "; expected one"
            )
        return found[0]

    def payload(self, dependency: dict, values: dict, changed: list[str]) -> dict:
        """The request body for ``dependency``; ``values`` maps ``"id.prop"`` to a value (None
        for any input or state not given)."""
        outputs = _outputs(dependency)
        return {
            "output": dependency["output"],
            "outputs": outputs if dependency["output"].startswith("..") else outputs[0],
            "inputs": [_value(i, values) for i in dependency["inputs"]],
            "state": [_value(s, values) for s in dependency.get("state", [])],
            "changedPropIds": changed,
        }

    def call(self, dependency: dict, values: dict, changed: list[str]) -> CallbackResult:
        """POST one callback and return what it set; raises on anything but 200 or 204."""
        body = self.payload(dependency, values, changed)
        started = time.perf_counter()
        response = self._post(body, {})
        seconds = time.perf_counter() - started
        if response.status_code == 204:
            return CallbackResult(204, {}, seconds)
        data = response.json()
        return CallbackResult(response.status_code, data.get("response", {}), seconds)

    def run_background(
        self,
        dependency: dict,
        values: dict,
        changed: list[str],
        *,
        timeout_s: float = 120.0,
        poll_s: float = 0.25,
    ) -> CallbackResult:
        """Start a background callback and poll it until it answers, as the renderer does."""
        body = self.payload(dependency, values, changed)
        started = time.perf_counter()
        handles = self._post(body, {}).json()
        if "cacheKey" not in handles:
            raise DashProtocolError(f"not a background callback answer: {str(handles)[:200]}")
        params = {"cacheKey": handles["cacheKey"], "job": handles["job"]}
        # While polling, the renderer sends the same body with every value emptied.
        polled = {
            **body,
            "inputs": [{**i, "value": None} for i in body["inputs"]],
            "state": [{**s, "value": None} for s in body["state"]],
        }
        while time.perf_counter() - started < timeout_s:
            time.sleep(poll_s)
            response = self._post(polled, params)
            if response.status_code == 204:
                return CallbackResult(204, {}, time.perf_counter() - started)
            data = response.json()
            if "response" in data or "sideUpdate" in data:  # a failed job answers only the side
                seconds = time.perf_counter() - started
                return CallbackResult(
                    200, data.get("response", {}), seconds, data.get("sideUpdate", {})
                )
        raise TimeoutError(f"background callback {dependency['output'][:60]} ran past {timeout_s}s")

    def _post(self, body: dict, params: dict) -> requests.Response:
        query = {"endId": self.end_id, **params} if self.end_id else params
        response = self.session.post(
            self.base_url + "/_dash-update-component",
            params=query,
            json=body,
            timeout=self.timeout_s,
        )
        if response.status_code not in (200, 204):
            raise DashProtocolError(
                f"callback {body['output'][:60]} answered {response.status_code}: "
                f"{response.text[:300]}"
            )
        return response


def _outputs(dependency: dict) -> list[dict]:
    return split_outputs(dependency["output"])


def _name(spec: dict) -> str:
    return f"{spec['id']}.{spec['property']}"


def _value(spec: dict, values: dict) -> dict:
    return {"id": spec["id"], "property": spec["property"], "value": values.get(_name(spec))}
