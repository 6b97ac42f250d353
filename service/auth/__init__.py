"""Auth at the edge: who is calling, and which topics their token grants.

    tokens.py         Principal, where a token is read from, time claims, ``mint``
    keys.py           JWKS: public keys fetched from AUTH_JWKS_URL, refreshed in the background
    claims.py         the topics claim (verbatim name or dotted path) and AUTH_GRANTS templates
    authenticator.py  Authenticator: token → Principal (HS256 secrets + JWKS keys)

``create_app`` builds one ``Authenticator(settings)``; when ``AUTH_JWKS_URL`` is set, the
lifespan runs ``authenticator.jwks.run``. Handlers call ``await auth.identify(request)``.
"""

from .authenticator import Authenticator, UnknownKey
from .claims import GrantTemplate, claim_at, topics_from
from .keys import Jwks, PublicKey
from .tokens import (
    ANONYMOUS,
    MAX_EXPIRES_AT,
    MAX_TOKEN_BYTES,
    Principal,
    mint,
    numeric_date,
    token_from,
)

__all__ = [
    "ANONYMOUS", "MAX_EXPIRES_AT", "MAX_TOKEN_BYTES", "Authenticator", "GrantTemplate", "Jwks",
    "Principal", "PublicKey", "UnknownKey", "claim_at", "mint", "numeric_date", "token_from",
    "topics_from",
]
