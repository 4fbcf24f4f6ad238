"""What the served model adds to MLflow's scoring server: refusals before a body is read, and ``Retry-After``.

``mlflow models serve`` (MLflow 3.17.2, ``mlflow/pyfunc/scoring_server/__init__.py``) runs a FastAPI
app whose ``/invocations`` handler reads the whole request body (``await request.body()``), parses
it into a DataFrame and only then calls the model's ``predict`` in a worker thread. A model can
choose the status of an error (``MlflowException.get_http_status_code``) and add JSON fields to it,
but it cannot set a response header, and it sees a request only after all of it is in memory. The
server has no request-size limit of its own, and no option or hook for either (read in its
source: ``init``, ``_async_catch_mlflow_exception``, ``get_cmd``; the options of
``mlflow models serve`` are ``-m -p -h -t -w --env-manager --no-conda --install-mlflow``).

So, when the model is loaded by that server (the environment variable ``__pyfunc_model_path__``,
which ``scoring_server.get_cmd`` sets for the uvicorn process, is present), :func:`install` wraps
the function the server decorates its ``/invocations`` handler with,
``scoring_server._async_catch_mlflow_exception``. The server's ``app.py`` loads the model
(``load_context``) before it calls ``scoring_server.init``, which looks that function up then, so
the wrapper is in place when the app is built. The wrapped handler, before the body is read:

* answers **411** to a request without ``Content-Length`` (a chunked upload cannot be sized first);
* answers **413** when ``Content-Length`` is above ``serving.max_request_mib`` (plus
  :data:`JSON_SLACK_BYTES` for the JSON around the base64 text);
* admits the request (:class:`~pancreas_seg.inference.admission.Admission`); when
  ``max_in_flight + max_queue`` requests are admitted it waits in the
  :class:`~pancreas_seg.inference.admission.WaitingRoom`, first come first served, and answers
  **503** when that room is full (``max_waiting``) or the wait passes ``queue_timeout_s``;
* logs one line, not a stack trace, when the client disconnects before its body is read;

and after the server's own handler has answered, adds ``Retry-After: <serving.retry_after_s>`` to
every 503 (the model's, when no slot freed in time). Everything else is MLflow's own handler.

``_async_catch_mlflow_exception`` is private to MLflow: the wrapper checks that it exists and is
a function, and otherwise logs a warning and leaves the server as it is. The model's own checks do
not depend on it: without the guard a request past the limits is still refused (413/400) by
``predict``, only after MLflow has read it, and a 503 still carries ``retry_after_s`` in its JSON
body, without the header. ``tests/inference/test_serving_safety.py`` checks the header and the
early refusals against the real ``mlflow models serve``; after an MLflow upgrade it tells whether
the guard still installs. (A header on every response is also possible without code: uvicorn's
``--header`` option, ``UVICORN_HEADERS=Retry-After:10`` in the server's environment; that puts it on
200s and 400s too, where it means nothing.)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from pancreas_seg.inference.admission import CURRENT_TICKET, Admission, Overloaded, WaitingRoom

logger = logging.getLogger(__name__)

SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"
"""Set by ``mlflow.pyfunc.scoring_server.get_cmd`` (``_SERVER_MODEL_PATH``) for the server process."""
JSON_SLACK_BYTES = 64 * 1024
"""HTTP body bytes allowed beyond ``serving.max_request_mib``: the JSON around the base64 text."""
_MARK = "_pancreas_seg_guard"


class _GuardState:
    """What the installed wrapper reads: replaced when a model is loaded again in the same process."""

    admission: Admission | None = None
    waiting_room: WaitingRoom | None = None
    max_body_bytes: int = 0
    retry_after_s: int = 0


_STATE = _GuardState()


def in_scoring_server() -> bool:
    """True in the process MLflow's scoring server loads the model in (``mlflow models serve``)."""
    return SERVER_MODEL_PATH_ENV in os.environ


def _json(status: int, error_code: str, message: str, **fields: Any) -> Any:
    """A JSON answer shaped as MLflow's own errors (``error_code``, ``message``, extra fields)."""
    from fastapi.responses import Response  # noqa: PLC0415 - only inside the scoring server

    headers = {"Retry-After": str(fields["retry_after_s"])} if "retry_after_s" in fields else None
    return Response(content=json.dumps({"error_code": error_code, "message": message, **fields}),
                    status_code=status, media_type="application/json", headers=headers)


def _guard(handler: Callable[..., Any]) -> Callable[..., Any]:
    from starlette.requests import ClientDisconnect  # noqa: PLC0415 - only inside the scoring server

    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        request = kwargs.get("request", args[0] if args else None)
        admission = _STATE.admission
        if admission is None or request is None:
            return await handler(*args, **kwargs)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            logger.warning("refused a request without Content-Length (411)")
            return _json(411, "BAD_REQUEST", "a Content-Length header is required (no chunked uploads)")
        if int(length) > _STATE.max_body_bytes:
            logger.warning("refused a request of %s bytes before reading it (413; limit %d)", length,
                           _STATE.max_body_bytes)
            return _json(413, "INVALID_PARAMETER_VALUE",
                         f"the request body is {length} bytes, more than the limit of {_STATE.max_body_bytes} bytes")
        try:
            room = _STATE.waiting_room
            ticket = await room.admit(admission) if room is not None else admission.admit()
        except Overloaded as exc:
            logger.warning("refused a request before reading it: %s (503)", exc)
            return _json(503, "TEMPORARILY_UNAVAILABLE", str(exc), retry_after_s=exc.retry_after_s)
        token = CURRENT_TICKET.set(ticket)
        try:
            response = await handler(*args, **kwargs)
        except ClientDisconnect:
            logger.warning("the client disconnected before its request was read (499)")
            return _json(499, "CLIENT_CLOSED_REQUEST", "the client disconnected before its request was read")
        finally:
            CURRENT_TICKET.reset(token)
            ticket.release()
        if getattr(response, "status_code", None) == 503 and "retry-after" not in response.headers:
            response.headers["Retry-After"] = str(_STATE.retry_after_s)
        return response

    return guarded


def install(admission: Admission, max_request_bytes: int, retry_after_s: int,
            waiting_room: WaitingRoom | None = None) -> bool:
    """Wrap MLflow's ``/invocations`` handler (see the module docstring); True when in place.

    Call it from the model's ``load_context`` in the scoring server's process, before the server
    builds its app. Calling it again (a second model load) only replaces the settings.
    """
    _STATE.admission, _STATE.retry_after_s, _STATE.waiting_room = admission, retry_after_s, waiting_room
    _STATE.max_body_bytes = max_request_bytes + JSON_SLACK_BYTES
    try:
        from mlflow.pyfunc import scoring_server  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - mlflow is a dependency
        logger.warning("serving guard not installed (%s): no Retry-After header, no refusal before a body is read",
                       exc)
        return False
    original = getattr(scoring_server, "_async_catch_mlflow_exception", None)
    if getattr(original, _MARK, False):
        return True
    if not callable(original):
        logger.warning("serving guard not installed: this MLflow's scoring server has no "
                       "_async_catch_mlflow_exception; 503s carry retry_after_s in their body but no "
                       "Retry-After header, and request sizes are checked only after MLflow has read them")
        return False

    @functools.wraps(original)
    def guarded_catch(func: Callable[..., Any]) -> Callable[..., Any]:
        return _guard(original(func))

    setattr(guarded_catch, _MARK, True)
    scoring_server._async_catch_mlflow_exception = guarded_catch
    logger.info("serving guard installed: Content-Length limit %d bytes, admission before reading, "
                "Retry-After %d s on 503", _STATE.max_body_bytes, retry_after_s)
    return True
