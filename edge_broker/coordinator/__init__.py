"""The coordinator behind ``deft edge serve``: registry, bundle distribution, rounds, evaluation, report.

One module per job: ``config`` (what a run is), ``registry`` (who is in the fleet), ``bundle_server``
(bundles over MQTT in resumable chunks), ``rounds`` (one round: task, collect, validate, aggregate),
``evaluation`` (plug into the full model and score it), ``report`` (JSON + PNG), ``coordinator``
(the loop that ties them together and resumes after a restart).
"""

from edge_broker.coordinator.config import CoordinatorConfig, CoordinatorError

__all__ = ["CoordinatorConfig", "CoordinatorError"]
