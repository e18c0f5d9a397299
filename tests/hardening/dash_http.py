"""Calling a Dash app's callbacks over HTTP, with the payloads its renderer would send.

Tests name a callback by its page module and function name (and, when one function is
registered for several pages, by an output it writes) and give the values of the inputs and
states they care about (``"attention-prompt.value"``). Every other input is ``None``; every
``ALL`` input is an empty list, as for a page with nothing clicked yet. A pattern-matching
input or state is named by its id's ``type`` (``"figure-download-request.data"``), and
``match`` fills in the ``MATCH`` wildcards of a ``MATCH`` callback (``{"graph": "..."}``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlencode

from dash.dependencies import Output, Wildcard

_WILDCARDS = ("MATCH", "ALL", "ALLSMALLER")
_CONFIG = re.compile(r'<script id="_dash-config" type="application/json">(.*?)</script>', re.S)


@dataclass(frozen=True)
class CallbackReply:
    """What ``/_dash-update-component`` answered: the HTTP status and the outputs it set.

    Attributes:
        status: HTTP status code (200 with outputs, 204 when the callback prevented the update).
        text: The raw body, to look for tracebacks.
        outputs: ``{"<id>.<property>": value}`` of every output the reply sets; a dict id is
            written as Dash writes it (sorted, compact JSON).
        side: ``{"<id>.<property>": value}`` of what the callback set with ``set_props``.
        document: The whole JSON reply, None when it was not JSON.
    """

    status: int
    text: str
    outputs: dict
    side: dict
    document: object = None

    def get(self, key: str, default=None):
        return self.outputs.get(key, default)


def _parse_id(raw: object) -> object:
    """A callback-map id: a plain string, or a pattern-matching id (stored as JSON text)."""
    if isinstance(raw, str) and raw.startswith("{"):
        return json.loads(raw)
    return raw


def _wildcard(value: object) -> str | None:
    """``"MATCH"``, ``"ALL"`` or ``"ALLSMALLER"`` for a wildcard (``["MATCH"]`` in the callback
    map's JSON, a ``dash.MATCH`` object in an ``Output``), None for a plain value."""
    if isinstance(value, list) and len(value) == 1 and value[0] in _WILDCARDS:
        return value[0]
    if isinstance(value, Wildcard):
        return value.value
    return None


def _concrete(component_id: dict, match: dict) -> dict:
    """``component_id`` with each ``MATCH`` wildcard replaced by its value in ``match``."""
    concrete = {}
    for key, value in component_id.items():
        if _wildcard(value) == "MATCH":
            if key not in match:
                raise KeyError(f"a MATCH callback needs match={{{key!r}: ...}}")
            value = match[key]
        concrete[key] = value
    return concrete


def _is_match(component_id: object) -> bool:
    return isinstance(component_id, dict) and any(
        _wildcard(value) == "MATCH" for value in component_id.values()
    )


def _flatten(props: dict) -> dict:
    flat = {}
    for component, values in (props or {}).items():
        for prop, value in values.items():
            flat[f"{component}.{prop}"] = value
    return flat


class DashHttp:
    """A Flask test client that speaks Dash's callback protocol.

    Args:
        dash_app: The ``dash.Dash`` instance.
    """

    def __init__(self, dash_app) -> None:
        self.dash_app = dash_app
        self.client = dash_app.server.test_client()
        # Dash fills its callback map when it serves the first request.
        response = self.client.get("/_dash-dependencies")
        assert response.status_code == 200, response.status_code

    def find(self, module: str, name: str, output: str | None = None) -> tuple[str, dict]:
        """The callback-map key and entry of the callback ``module.name`` (writing ``output``,
        an ``"id.prop"`` fragment of the key, when several callbacks share that name)."""
        found = []
        for key, entry in self.dash_app.callback_map.items():
            function = getattr(entry.get("callback"), "__wrapped__", None)
            if function is None or (function.__module__, function.__name__) != (module, name):
                continue
            if output is None or output in key:
                found.append((key, entry))
        if len(found) != 1:
            raise KeyError(f"{len(found)} callbacks {module}.{name} write {output!r}")
        return found[0]

    def payload(
        self,
        module: str,
        name: str,
        values: dict | None = None,
        changed: list[str] | None = None,
        *,
        output: str | None = None,
        match: dict | None = None,
    ) -> dict:
        """The request body the renderer sends for ``module.name`` with ``values`` filled in."""
        key, entry = self.find(module, name, output)
        values = dict(values or {})
        match = match or {}

        def filled(dependencies: list[dict]) -> list:
            items = []
            for dependency in dependencies:
                raw_id = _parse_id(dependency["id"])
                prop = dependency["property"]
                if isinstance(raw_id, dict):
                    name_key = f"{raw_id.get('type')}.{prop}"
                    if _is_match(raw_id):
                        concrete = _concrete(raw_id, match)
                        value = values.pop(name_key, None)
                        items.append({"id": concrete, "property": prop, "value": value})
                    else:  # ALL: one item per matching component; none unless given
                        items.append(values.pop(name_key, []))
                    continue
                value = values.pop(f"{raw_id}.{prop}", None)
                items.append({"id": raw_id, "property": prop, "value": value})
            return items

        inputs = filled(entry["inputs"])
        state = filled(entry["state"])
        if values:
            raise KeyError(f"{module}.{name} has no input or state {sorted(values)}")

        def output_spec(declared: Output) -> dict | list:
            prop = declared.component_property.split("@")[0]
            component_id = _parse_id(declared.component_id)
            if _is_match(component_id):
                return {"id": _concrete(component_id, match), "property": prop}
            if isinstance(component_id, dict):  # ALL with no matching component
                return []
            return {"id": component_id, "property": prop}

        declared = entry["output"]
        if isinstance(declared, (list, tuple)):
            outputs = [output_spec(one) for one in declared]
        else:
            outputs = output_spec(declared)
        if changed is None:
            first = inputs[0]
            if isinstance(first, dict):
                first_id = first["id"]
                if isinstance(first_id, dict):
                    first_id = json.dumps(first_id, sort_keys=True, separators=(",", ":"))
                changed = [f"{first_id}.{first['property']}"]
            else:
                changed = []
        return {
            "output": key,
            "outputs": outputs,
            "inputs": inputs,
            "state": state,
            "changedPropIds": changed,
        }

    def call(
        self,
        module: str,
        name: str,
        values: dict | None = None,
        changed: list[str] | None = None,
        *,
        output: str | None = None,
        match: dict | None = None,
    ) -> CallbackReply:
        """POST the callback and read its reply."""
        return self.post(self.payload(module, name, values, changed, output=output, match=match))

    def end_id(self) -> str | None:
        """The page-load token the renderer sends with background callbacks (``endId``)."""
        html = self.client.get("/").get_data(as_text=True)
        found = _CONFIG.search(html)
        return json.loads(found.group(1)).get("end_id") if found else None

    def post(self, body: object, *, raw: bool = False, params: dict | None = None) -> CallbackReply:
        """POST ``body`` (JSON, or raw text when ``raw``) to the callback endpoint, with the
        query ``params`` (``endId``, a background job's ``cacheKey`` and ``job``)."""
        url = "/_dash-update-component"
        if params:
            url += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        if raw:
            response = self.client.post(url, data=body, content_type="application/json")
        else:
            response = self.client.post(url, json=body)
        text = response.get_data(as_text=True)
        outputs, side, document = {}, {}, None
        if response.status_code == 200 and response.is_json:
            document = response.get_json()
            if isinstance(document, dict):
                outputs = _flatten(document.get("response"))
                side = _flatten(document.get("sideUpdate"))
        return CallbackReply(response.status_code, text, outputs, side, document)


def _id_key(component_id: object) -> str:
    """A component id as the callback map writes it: the string, or compact sorted JSON."""
    if isinstance(component_id, dict):
        return json.dumps(component_id, sort_keys=True, separators=(",", ":"))
    return str(component_id)


def layout_props(tree: object) -> dict[str, dict]:
    """``{id: props}`` of every component with an id in a serialised layout (what
    ``/_dash-layout`` or a page's ``_pages_content.children`` holds)."""
    found: dict[str, dict] = {}

    def walk(node: object) -> None:
        if isinstance(node, list):
            for child in node:
                walk(child)
            return
        if not isinstance(node, dict):
            return
        props = node.get("props")
        if not isinstance(props, dict):
            return
        if "id" in props:
            found[_id_key(props["id"])] = props
        for value in props.values():
            walk(value)

    walk(tree)
    return found


def initial_values(http: DashHttp, props: dict[str, dict], module: str, name: str) -> dict:
    """The inputs and states of ``module.name`` that a freshly rendered layout (``props`` from
    :func:`layout_props`) gives it, as the renderer sends them on the page's initial call."""
    _, entry = http.find(module, name)
    values = {}
    for dependency in [*entry["inputs"], *entry["state"]]:
        component = props.get(_id_key(_parse_id(dependency["id"])))
        if component is not None and dependency["property"] in component:
            values[f"{dependency['id']}.{dependency['property']}"] = component[
                dependency["property"]
            ]
    return values
