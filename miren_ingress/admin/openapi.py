"""The admin API's OpenAPI 3.0 document, served at `/openapi.json`.

Written by hand next to the handlers it describes; `tests/admin/test_openapi.py` checks that every
route of the aiohttp app is documented and runs a property-based client over it.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_NSTR = {"type": "string", "nullable": True}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "malformed request (bad JSON, wrong type, unknown field)",
        401: "missing or wrong bearer token",
        404: "not found",
        405: "method not allowed",
        409: "conflict with the current state",
        413: "request body too large",
        422: "invalid value (label, TTL, spec, host, name)",
        503: "the store is unavailable; nothing was changed",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in (401, 503, *statuses)}


_APP = {"name": "app", "in": "path", "required": True, "schema": _STR}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": _STR,
                    "message": _STR,
                    "details": {
                        "type": "object",
                        "description": "what more the error knows: a failed deploy --wait "
                        "names its version, its sandbox and the last lines of its log",
                    },
                },
            }
        },
    },
    "App": {
        "type": "object",
        "required": ["name", "active_version", "created_at"],
        "properties": {
            "name": _STR,
            "active_version": _NSTR,
            "created_at": _TIME,
            "loading_page": {"type": "string", "nullable": True},
        },
    },
    "AppSettings": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "loading_page": {
                "type": "string",
                "nullable": True,
                "enum": ["previews", "all", "none", None],
            }
        },
    },
    "NewApp": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"}
        },
    },
    "Route": {
        "type": "object",
        "required": ["host", "app", "default", "service", "request_timeout"],
        "properties": {
            "host": _STR,
            "app": _STR,
            "default": {"type": "boolean"},
            "service": _STR,
            "request_timeout": _NSTR,
        },
    },
    "RouteBody": {
        "type": "object",
        "required": ["app"],
        "additionalProperties": False,
        "properties": {
            "app": _STR,
            "default": {"type": "boolean"},
            "service": _STR,
            "request_timeout": {"type": "string", "description": "Go duration, e.g. 60s"},
            "force": {
                "type": "boolean",
                "description": "take the host from the app that has it (else 409 route_taken)",
            },
        },
    },
    "Concurrency": {
        "type": "object",
        "properties": {
            "requests_per_instance": {
                "type": "integer",
                "minimum": 1,
                "description": "scaling target: in-flight work per sandbox past which another "
                "one starts (not a limit)",
            },
            "max_requests_per_instance": {
                "type": "integer",
                "minimum": 1,
                "nullable": True,
                "description": "hard cap: work past it queues (absent: no cap)",
            },
            "max_instances": {"type": "integer", "nullable": True},
            "min_instances": {"type": "integer", "minimum": 0},
            "scale_down_delay": _NSTR,
        },
    },
    "VersionSpec": {
        "type": "object",
        "required": ["runtime"],
        "properties": {
            "runtime": {"type": "string", "enum": ["process", "upstream"]},
            "command": {"type": "array", "items": _STR},
            "env": {"type": "object", "additionalProperties": _STR},
            "cwd": _NSTR,
            "health_path": _NSTR,
            "boot_timeout": _STR,
            "urls": {"type": "array", "items": _STR},
            "concurrency": _ref("Concurrency"),
        },
    },
    "Source": {
        "type": "object",
        "properties": {"branch": _NSTR, "commit": _NSTR, "message": _NSTR},
    },
    "Version": {
        "type": "object",
        "required": ["id", "app", "created_at", "status", "spec"],
        "properties": {
            "id": _STR,
            "app": _STR,
            "created_at": _TIME,
            "status": {"type": "string", "enum": ["active", "ephemeral", "expired", "replaced"]},
            "spec": _ref("VersionSpec"),
            "source": _ref("Source"),
            "ephemeral_label": _STR,
            "ephemeral_ttl": _STR,
            "expires_at": _TIME,
        },
    },
    "DeployBody": {
        "type": "object",
        "description": "exactly one of spec or from_version; ephemeral makes a preview",
        "properties": {
            "spec": _ref("VersionSpec"),
            "from_version": _STR,
            "ephemeral": {
                "type": "object",
                "properties": {
                    "label": _STR,
                    "branch": _STR,
                    "ttl": {"type": "string", "description": "e.g. 24h, 90m, 7d"},
                },
            },
            "source": _ref("Source"),
            "wait": {
                "type": "boolean",
                "description": "boot one sandbox and answer once it is healthy (422 boot_failed "
                "with the reason and its log otherwise; a normal deploy then leaves the previous "
                "version active)",
            },
        },
    },
    "Deploy": {
        "type": "object",
        "required": ["version", "status", "urls"],
        "properties": {
            "version": _ref("Version"),
            "status": {"type": "string", "enum": ["active", "ephemeral"]},
            "urls": {"type": "array", "items": _STR},
            "expires_at": _TIME,
            "evicted": {
                "type": "array",
                "description": "previews this deploy deleted to stay within max_per_app",
                "items": {
                    "type": "object",
                    "required": ["id", "label"],
                    "properties": {"id": _STR, "label": _STR},
                },
            },
            "ready": {
                "type": "object",
                "description": "with wait: the sandbox that passed its health check",
                "properties": {"sandbox": _STR, "seconds": {"type": "number"}},
            },
        },
    },
    "Sandbox": {
        "type": "object",
        "required": ["id", "version", "status"],
        "properties": {
            "id": _STR,
            "version": _STR,
            "status": {"type": "string", "enum": ["pending", "running", "down", "stopped", "dead"]},
            "url": _NSTR,
            "pid": {"type": "integer", "nullable": True},
            "started_at": {"type": "string", "format": "date-time", "nullable": True},
            "last_activity": {"type": "string", "format": "date-time", "nullable": True},
            "reason": {
                "type": "string",
                "nullable": True,
                "description": "why it ended or is down (exit status or signal, boot timeout)",
            },
        },
    },
    "ProtectionBody": {
        "type": "object",
        "required": ["mode"],
        "additionalProperties": False,
        "properties": {
            "mode": {"type": "string", "enum": ["none", "previews", "all"]},
            "password": {"type": "string", "minLength": 8},
            "bypass_token": {"type": "string", "minLength": 8},
        },
    },
    "Protection": {
        "type": "object",
        "required": ["app", "mode", "password_set", "bypass_token_set"],
        "properties": {
            "app": _STR,
            "mode": _STR,
            "password_set": {"type": "boolean"},
            "bypass_token_set": {"type": "boolean"},
        },
    },
    "PreviewTemplateBody": {
        "type": "object",
        "required": ["spec", "webhook_secret"],
        "additionalProperties": False,
        "properties": {
            "spec": _ref("VersionSpec"),
            "label": {"type": "string", "enum": ["branch", "pr"]},
            "ttl": _STR,
            "webhook_secret": {"type": "string", "minLength": 16},
        },
    },
    "PreviewTemplate": {
        "type": "object",
        "required": ["app", "spec", "label", "webhook_secret_set"],
        "properties": {
            "app": _STR,
            "spec": _ref("VersionSpec"),
            "label": _STR,
            "ttl": _NSTR,
            "webhook_secret_set": {"type": "boolean"},
            "webhook_url": _STR,
        },
    },
    "Logs": {
        "type": "object",
        "required": ["sandbox", "lines"],
        "properties": {"sandbox": _STR, "lines": {"type": "array", "items": _STR}},
    },
}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def document() -> dict[str, Any]:
    label = {"name": "label", "in": "path", "required": True, "schema": _STR}
    vid = {"name": "id", "in": "path", "required": True, "schema": _STR}
    host = {"name": "host", "in": "path", "required": True, "schema": _STR}
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "security": [],
                "summary": "store, watch and route-table health",
                "responses": {
                    "200": _json({"type": "object"}, "healthy"),
                    "503": _json({"type": "object"}, "degraded"),
                },
            }
        },
        "/metrics": {
            "get": {
                "security": [],
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/v1/apps": {
            "get": {
                "summary": "list apps",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("App")}, "apps"),
                    **_errors(),
                },
            },
            "post": {
                "summary": "create an app",
                "requestBody": _body("NewApp"),
                "responses": {
                    "201": _json(_ref("App"), "created"),
                    **_errors(400, 409, 422),
                },
            },
        },
        "/v1/apps/{app}": {
            "parameters": [_APP],
            "get": {
                "summary": "one app",
                "responses": {"200": _json(_ref("App"), "the app"), **_errors(404)},
            },
            "patch": {
                "summary": "an app's settings: which hosts give browsers the loading page",
                "requestBody": _body("AppSettings"),
                "responses": {"200": _json(_ref("App"), "the app"), **_errors(400, 404, 409, 422)},
            },
            "delete": {
                "summary": "delete an app with its routes, versions and pools",
                "responses": {"204": {"description": "deleted"}, **_errors(404, 409)},
            },
        },
        "/v1/routes": {
            "get": {
                "summary": "list routes",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Route")}, "routes"),
                    **_errors(),
                },
            }
        },
        "/v1/routes/{host}": {
            "parameters": [host],
            "put": {
                "summary": "create or replace the route for a host (exact or *.base)",
                "requestBody": _body("RouteBody"),
                "responses": {
                    "200": _json(_ref("Route"), "replaced"),
                    "201": _json(_ref("Route"), "created"),
                    **_errors(400, 404, 409, 422),
                },
            },
            "delete": {
                "summary": "delete a route",
                "responses": {"204": {"description": "deleted"}, **_errors(404)},
            },
        },
        "/v1/apps/{app}/deploys": {
            "parameters": [_APP],
            "post": {
                "summary": "deploy: normal (activates), rollback, or ephemeral preview",
                "requestBody": _body("DeployBody"),
                "responses": {
                    "201": _json(_ref("Deploy"), "deployed"),
                    **_errors(400, 404, 409, 422),
                },
            },
        },
        "/v1/apps/{app}/versions": {
            "parameters": [_APP],
            "get": {
                "summary": "versions, newest first",
                "parameters": [
                    {"name": "ephemeral", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Version")}, "versions"),
                    **_errors(400, 404),
                },
            },
        },
        "/v1/apps/{app}/versions/{id}": {
            "parameters": [_APP, vid],
            "get": {
                "summary": "one version",
                "responses": {"200": _json(_ref("Version"), "the version"), **_errors(404)},
            },
            "delete": {
                "summary": "delete a version with its pools (not the active one)",
                "responses": {"204": {"description": "deleted"}, **_errors(404, 409)},
            },
        },
        "/v1/apps/{app}/ephemeral/{label}": {
            "parameters": [_APP, label],
            "patch": {
                "summary": "replace a preview's TTL (expiry = now + ttl)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["ttl"],
                                "additionalProperties": False,
                                "properties": {"ttl": _STR},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("Version"), "extended"),
                    **_errors(400, 404, 409, 422),
                },
            },
            "delete": {
                "summary": "delete every version carrying the label",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["deleted"],
                            "properties": {"deleted": {"type": "array", "items": _STR}},
                        },
                        "deleted",
                    ),
                    **_errors(404, 409, 422),
                },
            },
        },
        "/v1/apps/{app}/sandboxes": {
            "parameters": [_APP],
            "get": {
                "summary": "sandboxes of the app's versions",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Sandbox")}, "sandboxes"),
                    **_errors(404),
                },
            },
        },
        "/v1/sandboxes/{id}/logs": {
            "parameters": [vid],
            "get": {
                "summary": "the tail of a sandbox's stdout/stderr log",
                "parameters": [{"name": "tail", "in": "query", "schema": {"type": "integer"}}],
                "responses": {"200": _json(_ref("Logs"), "log lines"), **_errors(400, 404)},
            },
        },
        "/v1/apps/{app}/protection": {
            "parameters": [_APP],
            "put": {
                "summary": "protect an app's previews (or all its hosts) with a password and a "
                "bypass token for CI; stored hashed, never answered",
                "requestBody": _body("ProtectionBody"),
                "responses": {
                    "200": _json(_ref("Protection"), "set"),
                    **_errors(400, 404, 409, 422),
                },
            },
            "get": {
                "summary": "the app's protection (whether a password and a token are set)",
                "responses": {"200": _json(_ref("Protection"), "the protection"), **_errors(404)},
            },
        },
        "/v1/apps/{app}/preview-template": {
            "parameters": [_APP],
            "put": {
                "summary": "what a pull request deploys as its preview (GitHub webhooks)",
                "requestBody": _body("PreviewTemplateBody"),
                "responses": {
                    "200": _json(_ref("PreviewTemplate"), "set"),
                    **_errors(400, 404, 409, 422),
                },
            },
            "get": {
                "summary": "the app's preview template (its secret never shown)",
                "responses": {
                    "200": _json(_ref("PreviewTemplate"), "the template"),
                    **_errors(404),
                },
            },
            "delete": {
                "summary": "stop following pull requests",
                "responses": {"204": {"description": "deleted"}, **_errors(404)},
            },
        },
        "/hooks/github/{app}": {
            "parameters": [_APP],
            "post": {
                "security": [],
                "summary": "GitHub webhook: pull_request opened/reopened/synchronize deploy the "
                "preview, closed deletes it; authenticated by X-Hub-Signature-256 only",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json({"type": "object"}, "applied (or a duplicate delivery, or ping)"),
                    "202": _json({"type": "object"}, "another event: ignored"),
                    **_errors(400, 401, 422),
                },
            },
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Miren edge admin API", "version": "1"},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
