"""nursery_down: run long-lived trio services that shut down without losing work.

::

    import nursery_down as nd

    sup = nd.Supervisor(name="orders", grace=30.0)

    @sup.service
    async def consumer(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async for msg in ctx.intake(receive_channel):
            async with ctx.job(msg.id, topic="orders"):
                await handle(msg)

    raise SystemExit(nd.run(sup))
"""

from ._context import ServiceContext as ServiceContext
from ._events import Event as Event
from ._events import Subscription as Subscription
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import DependencyCycleError as DependencyCycleError
from ._exceptions import DrainingError as DrainingError
from ._exceptions import FleetError as FleetError
from ._exceptions import FleetUnavailableError as FleetUnavailableError
from ._exceptions import InvalidTransitionError as InvalidTransitionError
from ._exceptions import LockLostError as LockLostError
from ._exceptions import NoPostgresError as NoPostgresError
from ._exceptions import NurseryDownError as NurseryDownError
from ._exceptions import UnknownJobError as UnknownJobError
from ._exceptions import UnknownProcessError as UnknownProcessError
from ._exceptions import UnknownServiceError as UnknownServiceError
from ._exceptions import UnknownSourceError as UnknownSourceError
from ._exceptions import UpgradeError as UpgradeError
from ._jobs import Job as Job
from ._listeners import listener as listener
from ._notify import serve_notify as serve_notify
from ._pool import worker_pool as worker_pool
from ._run import open_supervisor as open_supervisor
from ._run import run as run
from ._signals import serve_signals as serve_signals
from ._spec import Backoff as Backoff
from ._state import RestartPolicy as RestartPolicy
from ._state import ServiceState as ServiceState
from ._supervisor import EXIT_FAILED as EXIT_FAILED
from ._supervisor import EXIT_HARD_CANCELLED as EXIT_HARD_CANCELLED
from ._supervisor import EXIT_OK as EXIT_OK
from ._supervisor import EXIT_USAGE as EXIT_USAGE
from ._supervisor import Supervisor as Supervisor

__version__ = "0.1.0"

__all__ = [
    "EXIT_FAILED",
    "EXIT_HARD_CANCELLED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Backoff",
    "ConfigurationError",
    "DependencyCycleError",
    "DrainingError",
    "Event",
    "FleetError",
    "FleetUnavailableError",
    "InvalidTransitionError",
    "Job",
    "LockLostError",
    "NoPostgresError",
    "NurseryDownError",
    "RestartPolicy",
    "ServiceContext",
    "ServiceState",
    "Subscription",
    "Supervisor",
    "UnknownJobError",
    "UnknownProcessError",
    "UnknownServiceError",
    "UnknownSourceError",
    "UpgradeError",
    "listener",
    "open_supervisor",
    "run",
    "serve_notify",
    "serve_signals",
    "worker_pool",
]
