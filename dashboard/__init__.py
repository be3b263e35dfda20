"""The nursery_down dashboard: a quart-trio app served by hypercorn in the supervisor's nursery.

Usually started for you: ``nd.run(sup, dashboard="127.0.0.1:8080")`` or
``nursery-down run TARGET --dashboard 127.0.0.1:8080``. To run it yourself::

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.serve)
        info = await nursery.start(serve_dashboard, sup, "127.0.0.1:0")
        print(info.url, info.login_url)

Routes
------
``GET /``                 the page (first snapshot rendered on the server, then live)
``GET /api/snapshot``     the snapshot as JSON (``?max_jobs=N`` per service, default 50,
                          or ``all``)
``GET /api/events``       server-sent events: a ``snapshot`` message (with the recent
                          ``events``), then an ``event`` message for each thing that
                          happens and a ``snapshot`` each second that counts changed;
                          ``: ping`` comments keep a quiet stream open
``POST /api/drain``       drain the whole app; body ``{"grace": 10}`` (optional)
``POST /api/restart``     restart every service: stop in stop order, start in start order
``POST /api/escalate``    hard-cancel every in-flight job now
``POST /api/extend-grace``  body ``{"seconds": 30}``, optionally ``"service": "name"``
``POST /api/services/<name>/drain``  body ``{"grace": 10}`` (optional)
``POST /api/services/<name>/start|restart|escalate``  no body
``POST /logout``          sign out: revoke the session cookie
``GET /livez``            200 while the event loop runs
``GET /readyz``           200 when running, 503 while starting, draining or stopped
``GET /metrics``          Prometheus text

Snapshots on the stream and in action answers have job lists capped at 50 per
service and add ``server_time`` (the server's clock, for ages computed in the page).

Actions take JSON or a form with the same fields and answer ``202`` with the new
snapshot (a drain adds ``"outcome"``: whether it began, or moved or kept the deadline
of a drain under way); errors are ``{"error": "..."}`` with a one-line reason: 400
bad body or query, 401 no token, 403 cross-site, 404 unknown service, 405 not POST,
409 not possible in the current state (a drain or escalate of a stopped or failed
service included), 421 unknown Host, 429 too many wrong tokens. A form posted by a
browser without JavaScript is redirected back to ``/``. Every JSON answer and event
is valid JSON: non-finite numbers are sent as ``null``.

Security
--------
Everything but the probes needs the operator token: ``Authorization: Bearer TOKEN``,
or the session cookie (HttpOnly, SameSite=Strict, 12 hours, revoked by ``/logout``)
that opening ``/?token=TOKEN`` sets. Reads need it too, as the page shows job keys
and details. Beyond loopback the token needs 16 characters or more; 10 wrong tokens
within 60 s from one address make it wait out the 60 s. Actions must be POSTs from
the page's own origin (``Sec-Fetch-Site`` and ``Origin`` are checked).
Requests whose Host header is not the bound address, a loopback name with the
port, or a name in ``NURSERY_DOWN_ALLOWED_HOSTS`` are refused. Every action goes
to the ``nursery_down.audit`` logger (request data escaped, one line each) and into
the supervisor's event timeline.
"""

from ._app import create_app as create_app
from ._serve import DashboardInfo as DashboardInfo
from ._serve import serve_dashboard as serve_dashboard
from ._serve import shield_sends as shield_sends

__all__ = ["DashboardInfo", "create_app", "serve_dashboard", "shield_sends"]
