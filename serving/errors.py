"""Every client-visible failure, raised inside as a typed error and turned into the OpenAI error
shape once, at the HTTP edge (`ServingError.body`, by the exception handlers of `serving.route.core.create_app`).
Nothing else reaches a client: no traceback, no path.

    ServingError                    status  type
    ├── BadRequest                  400     invalid_request_error
    ├── Unauthorized                401     authentication_error
    ├── Forbidden                   403     permission_error
    ├── NotFound                    404     not_found_error
    ├── Conflict                    409     invalid_request_error
    ├── PayloadTooLarge             413     invalid_request_error
    ├── HeadersTooLarge             431     invalid_request_error
    ├── TooManyRequests             429     rate_limit_error       (with Retry-After)
    └── Unavailable                 503     service_unavailable    (with Retry-After when overloaded)
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServingError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServingError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ServingError):
    status = 401
    type = "authentication_error"


class Forbidden(ServingError):
    status = 403
    type = "permission_error"


class NotFound(ServingError):
    status = 404
    type = "not_found_error"


class Conflict(ServingError):
    status = 409
    type = "invalid_request_error"


class PayloadTooLarge(ServingError):
    status = 413
    type = "invalid_request_error"


class TooManyRequests(ServingError):
    status = 429
    type = "rate_limit_error"


class Unavailable(ServingError):
    status = 503
    type = "service_unavailable"


class HeadersTooLarge(ServingError):
    status = 431
    type = "invalid_request_error"
