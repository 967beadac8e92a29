"""Bearer-token auth for the HTTP API (docs/http-api.md#authentication).

Two roles. The admin token guards registry writes: with one configured, a write without
`Authorization: Bearer ...` is 401 and one with a wrong token 403; with none configured,
writes are open (a local, single-user server). API keys guard inference and registry
reads, only when some are configured; the admin token is accepted there too. A missing
or invalid API key is 401 (what OpenAI answers, so its SDK raises AuthenticationError).

Secrets are held as `SecretStr` so they never show in a repr, a log line or a settings
dump, and are compared with `hmac.compare_digest` so timing reveals nothing of them.

Use: `Depends(auth.require_admin)` / `Depends(auth.require_api_key)` on a route (bound
methods are FastAPI dependencies). They raise `adapters.tasks.errors.Unauthorized` / `Forbidden`,
which the route class or the app's exception handler turns into the error body (docs/http-api.md#errors).
"""

from __future__ import annotations

import hmac

from fastapi import Header
from pydantic import BaseModel, ConfigDict, Field, SecretStr

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


class AuthSettings(BaseModel):
    """Who may do what. Built from `--admin-token` and `--api-keys` by the CLI."""

    model_config = ConfigDict(frozen=True)

    admin_token: SecretStr | None = Field(
        None, description="Bearer token for registry writes; None leaves writes open."
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Bearer tokens accepted for inference and registry reads; empty: open."
    )

    @property
    def admin_required(self) -> bool:
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())

    @property
    def api_key_required(self) -> bool:
        return any(k.get_secret_value() for k in self.api_keys)

    def check_admin(self, authorization: str | None) -> None:
        """Raise Unauthorized (no bearer) or Forbidden (wrong one) unless this is the admin."""
        if self.admin_required:
            assert self.admin_token is not None
            wrong = Forbidden("the admin token is not valid")
            _check(authorization, [self.admin_token], "this operation needs an admin token", wrong)

    def check_api_key(self, authorization: str | None) -> None:
        """Raise Unauthorized unless a configured API key (or the admin token) is sent.

        A wrong key is 401, as OpenAI and vLLM answer an invalid key (their SDK raises
        AuthenticationError); 403 stays for a valid caller without the right (an API key on
        a registry write)."""
        if self.api_key_required:
            accepted = [k for k in self.api_keys if k.get_secret_value()]
            if self.admin_token is not None and self.admin_required:
                accepted.append(self.admin_token)
            _check(authorization, accepted, "this server needs an API key", Unauthorized("the API key is not valid"))

    async def require_admin(self, authorization: str | None = Header(None)) -> None:
        """FastAPI dependency for registry writes."""
        self.check_admin(authorization)

    async def require_api_key(self, authorization: str | None = Header(None)) -> None:
        """FastAPI dependency for inference (and registry reads)."""
        self.check_api_key(authorization)


def _check(authorization: str | None, accepted: list[SecretStr], needs: str, wrong: Exception) -> None:
    """Unauthorized when no bearer token is sent, `wrong` when it is none of `accepted`."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized(f"{needs}: send 'Authorization: Bearer <token>'")
    if not _matches(token, accepted):
        raise wrong
