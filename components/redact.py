"""One redaction for everything we log, print, store or put into an error: credentials written
inside a URI (scheme://user:password@host) and the values of the secret variables of the process
environment never leave it."""

from __future__ import annotations

import os
import re

# Variables whose values are secrets wherever they appear (AWS_*, MLflow and Ray credentials).
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD")
MASK = "***"
# userinfo of a URI: after "scheme://", up to the last "@" before the host (a password may hold "@"
# only percent-encoded, so the first "/" after the scheme ends the authority)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"]+(?:@[^/\s@'\"]+)*)@")


def redact(text: object, environ: dict | None = None) -> str:
    """`text` (any object, as str) with URI credentials and secret variable values masked."""
    result = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(text))
    env = os.environ if environ is None else environ
    for name in SECRET_VARIABLES:
        value = env.get(name)
        if value and len(value) >= 4:  # a 1-3 character "secret" would mask ordinary text
            result = result.replace(value, MASK)
    return result
