"""Bearer-token auth for the HTTP API: keys with a tenant and a role (docs/http-api.md#authentication).

Every request is made by a `Principal`: a key id, a tenant (or none) and a role (reader,
writer, admin). Keys come from three places: the admin token (`--admin-token`, an admin of
every tenant), `--api-keys` (readers of no tenant: the base and shared names only), and the
keys stored hashed in the registry store (adapters/registry/keys.py, made with
`POST /v1/keys` or `capaserve keys create`). Without a bearer token a request is anonymous:
an admin while nothing is configured (a local, single-user server), a reader while only an
admin token is set (reads stay open as before), refused (401) once API keys or stored keys exist.

An unknown or revoked key is 401 on reads (what OpenAI answers, so its SDK raises
AuthenticationError) and 403 on writes (a wrong admin token, as before); a valid key without
the right is 403. Which names a principal sees and writes is `Principal.can_see` /
`can_write`: a name it may not see is answered exactly as an unknown name (404).

Use: `Depends(auth.require_admin)` / `Depends(auth.require_api_key)` on a route (bound
methods are FastAPI dependencies). They raise `adapters.tasks.errors.Unauthorized` / `Forbidden`,
which the route class or the app's exception handler turns into the error body (docs/http-api.md#errors).

Secrets are held as `SecretStr` and compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hmac

from dataclasses import dataclass

from fastapi import Header, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from adapters.manifest import tenant_of
from adapters.registry.keys import KeyStore, Role
from adapters.tasks.errors import Forbidden, Unauthorized


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, secrets: list[SecretStr]) -> bool:
    """Constant-time membership: every secret is compared, whatever matched first."""
    hit = False
    for secret in secrets:
        hit |= hmac.compare_digest(token.encode(), secret.get_secret_value().encode())
    return hit


@dataclass(frozen=True)
class Principal:
    """Who makes a request: what it may see and write follows from its tenant and role."""

    key_id: str
    tenant: str | None
    role: Role

    def can_see(self, name: str) -> bool:
        """Shared names are every key's; `tenant/x` is its tenant's keys' and the admins'."""
        owner = tenant_of(name.partition("@")[0])
        return owner is None or self.role is Role.admin or owner == self.tenant

    def can_write(self, name: str) -> bool:
        """Admins write every name; a writer only its own tenant's names."""
        if self.role is Role.admin:
            return True
        owner = tenant_of(name)
        return self.role is Role.writer and owner is not None and owner == self.tenant


ADMIN_TOKEN_ID = "admin-token"
API_KEY_ID = "api-key"
ANONYMOUS = "anonymous"


class AuthSettings(BaseModel):
    """Who may do what: the admin token and API keys (from the CLI) and the stored keys."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    admin_token: SecretStr | None = Field(None, description="An admin key; None: no admin token.")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Readers of no tenant: the base and shared names only."
    )
    keys: KeyStore | None = Field(None, description="The keys stored in the registry store.")

    @property
    def admin_required(self) -> bool:
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())

    def _api_keys(self) -> list[SecretStr]:
        return [k for k in self.api_keys if k.get_secret_value()]

    def configured(self) -> bool:
        """Whether any key exists: then /metrics needs an admin key."""
        return self.admin_required or bool(self._api_keys()) or (self.keys is not None and self.keys.any())

    def _anonymous(self, refresh: bool = True) -> Principal | None:
        if self._api_keys() or (self.keys is not None and self.keys.any(refresh)):
            return None
        return Principal(ANONYMOUS, None, Role.reader if self.admin_required else Role.admin)

    def identify(self, token: str, refresh: bool = True) -> Principal | None:
        """The principal of a bearer token, or None for an unknown or revoked key."""
        if self.admin_required and self.admin_token is not None and _matches(token, [self.admin_token]):
            return Principal(ADMIN_TOKEN_ID, None, Role.admin)
        if _matches(token, self._api_keys()):
            return Principal(API_KEY_ID, None, Role.reader)
        rec = self.keys.lookup(token, refresh) if self.keys is not None else None
        return Principal(rec.id, rec.tenant, rec.role) if rec is not None else None

    def authenticate(self, authorization: str | None, role: Role, refresh: bool = True) -> Principal:
        """The principal making a request that needs `role`; Unauthorized or Forbidden otherwise
        (refresh=False: from the stored keys' cached listing, reading no store)."""
        token = bearer_token(authorization)
        if token is None:
            who = self._anonymous(refresh)
            if who is None or not who.role.at_least(role):
                needs = {
                    Role.reader: "this server needs an API key",
                    Role.writer: "this operation needs an admin token or a writer key",
                    Role.admin: "this operation needs an admin token or an admin key",
                }[role]
                raise Unauthorized(f"{needs}: send 'Authorization: Bearer <token>'")
            return who
        who = self.identify(token, refresh)
        if who is None:
            anonymous = self._anonymous(refresh)
            if anonymous is not None and anonymous.role.at_least(role):
                # Nothing this request needs is protected: a token no key matches is ignored, as
                # clients such as the openai SDK always send one (OpenAI-compatible servers without
                # keys, vLLM's among them, accept any).
                return anonymous
            if role is Role.reader:
                raise Unauthorized("the API key is not valid")
            raise Forbidden("the key is not valid")
        if not who.role.at_least(role):
            raise Forbidden(f"this operation needs a {role.value} key")
        return who

    async def reader(self, request: Request, authorization: str | None = Header(None)) -> Principal:
        """FastAPI dependency for inference and registry reads; the principal is also kept on
        `request.state.principal`."""
        return _keep(request, await _authenticate(self, authorization, Role.reader))

    async def writer(self, request: Request, authorization: str | None = Header(None)) -> Principal:
        """FastAPI dependency for uploads and deletes (the route checks the name: `can_write`)."""
        return _keep(request, await _authenticate(self, authorization, Role.writer))

    async def admin(self, request: Request, authorization: str | None = Header(None)) -> Principal:
        """FastAPI dependency for key management and server paths."""
        return _keep(request, await _authenticate(self, authorization, Role.admin))


async def _authenticate(settings: AuthSettings, authorization: str | None, role: Role) -> Principal:
    # Re-listing the stored keys reads the store (a network call on S3), so it runs off the event
    # loop, at most every `KeyStore.ttl_s`; between listings every request is answered from the
    # cache on the loop itself: a thread hop per request took the ingress from 1.0 to 1.25 CPU-ms
    # per one-text request.
    if settings.keys is None or settings.keys.fresh():
        return settings.authenticate(authorization, role, refresh=False)
    return await run_in_threadpool(settings.authenticate, authorization, role)


def _keep(request: Request, who: Principal) -> Principal:
    request.state.principal = who
    return who


def principal_of(request: Request) -> Principal | None:
    """The principal an auth dependency found for this request (None if none ran)."""
    return getattr(request.state, "principal", None)
