"""Per-run typed API docs: ``/runs/{run}/docs``, a Swagger page whose operations are typed
from the run's own model, as Freak's per-field forms were.

``/runs/{run}/openapi.json`` is built from the schema a rank of the run registered: for
every declared field (nested models followed) a ``GET .../get/FIELD``, and

- a value (number, string, enum, boolean, optional of those): ``PUT .../set/FIELD`` with a
  ``value`` query parameter of the field's own type (Swagger shows a number box, a
  dropdown for a ``Literal``, true/false for a ``bool``);
- a list or a dict: ``PUT .../set/FIELD`` with a JSON body of the field's schema;
- a nested model: ``PATCH .../set/FIELD`` with a body of that model, every property
  optional (a partial merge), and its own fields in turn;

plus the whole state's get, patch, reset and stop. ``{rank}`` is a parameter (``0`` by
default, ``all`` for every rank). The Swagger UI files ship inside the package
(``static/vendor/swagger-ui``, swagger-ui-dist 5.35.0, Apache-2.0, served under ``/static``
with the console's): no CDN. The page's script (``static/docs.js``) adds the bearer token
the console keeps in ``sessionStorage`` to every request it makes.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from fastapi import APIRouter, Depends
from starlette.responses import HTMLResponse, Response

from runctl.bus.client import Client
from runctl.bus.errors import NotFound
from runctl.bus.subjects import check_token
from runctl.gateway.auth import require
from runctl.gateway.errors import json_response
from runctl.gateway.routes import ClientDep, RunParam

__all__ = ["ASSETS", "docs_page", "gateway_docs", "router", "run_openapi"]

router = APIRouter()
#: the package's Swagger UI files, served with the console's (gateway.console: /static)
ASSETS: Final = "/static/vendor/swagger-ui"
_VALUE_TYPES: Final = frozenset({"string", "number", "integer", "boolean", "null"})

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head><body>
<div id="swagger-ui" data-spec="{spec}"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script>
</body></html>
"""


def docs_page(title: str, spec_url: str) -> str:
    """The Swagger page for ``spec_url``, from the package's own Swagger UI files."""
    esc = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
    quote = "".join
    return _PAGE.format(
        title=quote(esc.get(c, c) for c in title),
        spec=quote(esc.get(c, c) for c in spec_url),
        assets=ASSETS,
    )


@router.get("/docs", include_in_schema=False)
async def gateway_docs() -> HTMLResponse:
    """The gateway's own Swagger page (every route, untyped state)."""
    return HTMLResponse(docs_page("runctl gateway", "/openapi.json"))


@router.get("/runs/{run}/docs", include_in_schema=False)
async def run_docs(run: RunParam) -> HTMLResponse:
    """The run's typed Swagger page (the spec is fetched with the page's token)."""
    run = check_token(run, "run")
    return HTMLResponse(docs_page(f"runctl: {run}", f"/runs/{run}/openapi.json"))


@router.get(
    "/runs/{run}/openapi.json",
    summary="OpenAPI of one run, typed from its model",
    tags=["runs"],
    dependencies=[Depends(require())],
)
async def run_spec(run: RunParam, client: ClientDep) -> Response:
    """The run's operations typed from the schema its first rank registered."""
    run = check_token(run, "run")
    return json_response(run_openapi(run, await _schema(client, run)))


async def _schema(client: Client, run: str) -> dict[str, Any]:
    infos = await client.ranks(run)
    ranks = sorted((i.record.rank for i in infos), key=lambda r: (not r.isdigit(), len(r), r))
    schema = await client.schema(run, ranks[0])
    if not isinstance(schema, dict):
        raise NotFound(run, message=f"run {run!r} has no model schema")
    return schema


# --- the spec --------------------------------------------------------------------------


def run_openapi(run: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI 3.1 document for ``run`` typed from its model's JSON ``schema``."""
    schema = _refs_to_components(copy.deepcopy(schema))
    defs = schema.pop("$defs", {})
    model = schema.get("title", "State")
    base = f"/runs/{run}/ranks/{{rank}}"
    paths: dict[str, dict[str, Any]] = {}
    whole = {"$ref": f"#/components/schemas/{model}"}
    paths[f"{base}/get"] = {"get": _op(f"Read the whole {model}", [model], response=whole)}
    paths[f"{base}/set"] = {
        "patch": _op(
            f"Merge a partial {model} (every field optional)",
            [model],
            body=_partial(schema, defs),
        )
    }
    paths[f"{base}/reset"] = {"delete": _op(f"Back to the {model} at control() time", [model])}
    paths[f"{base}/stop"] = {
        "post": _op(
            "Ask the program to stop",
            [model],
            query=[_param("reason", {"type": "string"}, "shown to the program", False)],
        )
    }
    _fields(schema, defs, [], base, paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"runctl: run {run}",
            "version": "1",
            "description": (
                f"The live state of run `{run}`, typed from its model `{model}`. `rank` is a "
                "rank of the run or `all`. Changes are validated by the program's model: a "
                "refused one answers 422 with pydantic's errors and changes nothing."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {**defs, model: schema},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def _fields(
    node: dict[str, Any],
    defs: dict[str, Any],
    prefix: list[str],
    base: str,
    paths: dict[str, dict[str, Any]],
) -> None:
    for name, prop in (node.get("properties") or {}).items():
        if not isinstance(prop, dict) or str(name).startswith("_"):
            continue
        parts = [*prefix, str(name)]
        dotted, url = ".".join(parts), "/".join(parts)
        tag = parts[0]
        target = _deref(prop, defs)
        item: dict[str, Any] = {"get": _op(f"Read {dotted}", [tag], response=prop)}
        if _is_model(target):
            item_set: dict[str, Any] = {
                "patch": _op(
                    f"Merge into {dotted} (every field optional)",
                    [tag],
                    body=_partial(target, defs),
                )
            }
        elif _is_value(prop, defs):
            description = prop.get("description") or f"the new {dotted}"
            item_set = {
                "put": _op(f"Set {dotted}", [tag], query=[_param("value", prop, description)])
            }
        else:
            item_set = {"put": _op(f"Set {dotted} (JSON body)", [tag], body=prop)}
        paths[f"{base}/get/{url}"] = item
        paths[f"{base}/set/{url}"] = item_set
        if _is_model(target) and len(parts) < 16:
            _fields(target, defs, parts, base, paths)


def _op(
    summary: str,
    tags: list[str],
    *,
    query: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    response: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": tags,
        "parameters": [
            {
                "name": "rank",
                "in": "path",
                "required": True,
                "description": "a rank of the run, or `all`",
                "schema": {"type": "string", "default": "0"},
            },
            *(query or []),
        ],
        "responses": {
            "200": {
                "description": "the value" if response is not None else "each rank's outcome",
                "content": {"application/json": {"schema": response or {}}},
            },
            "404": {"description": "no such run, rank or field"},
            "422": {"description": "refused by the model: nothing changed"},
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _param(name: str, schema: dict[str, Any], description: str, required: bool = True) -> Any:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def _deref(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The schema a ``$ref`` (or an ``allOf`` of one, pydantic's form with a default)
    points at."""
    ref = prop.get("$ref")
    if ref is None and len(prop.get("allOf", ())) == 1:
        ref = prop["allOf"][0].get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        if isinstance(target, dict):
            return target
    return prop


def _is_model(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "object" and "properties" in schema


def _is_value(prop: dict[str, Any], defs: dict[str, Any]) -> bool:
    """A value Swagger can take in one query box: scalar types, enums, their unions."""
    target = _deref(prop, defs)
    if "enum" in target or "const" in target:
        return True
    kind = target.get("type")
    if isinstance(kind, str):
        return kind in _VALUE_TYPES
    options = target.get("anyOf") or target.get("oneOf") or []
    return bool(options) and all(_is_value(o, defs) for o in options)


def _partial(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with no required property, nested models too (a patch names any part)."""
    out = {k: v for k, v in schema.items() if k != "required"}
    props = {}
    for name, prop in (schema.get("properties") or {}).items():
        target = _deref(prop, defs) if isinstance(prop, dict) else prop
        props[name] = _partial(target, defs) if _is_model(target) else prop
    if props:
        out["properties"] = props
    return out


def _refs_to_components(node: Any) -> Any:
    """JSON schema's ``#/$defs/X`` become OpenAPI's ``#/components/schemas/X``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                node[key] = "#/components/schemas/" + value.removeprefix("#/$defs/")
            else:
                _refs_to_components(value)
    elif isinstance(node, list):
        for value in node:
            _refs_to_components(value)
    return node
