"""The coordinator behind ``deft edge serve``: registry, bundle distribution, rounds, evaluation, report.

One module per job: ``config`` (what a run is), ``registry`` (who is in the fleet), ``bundle_server``
(bundles over MQTT in resumable chunks), ``inbox`` (every message from the devices, dispatched),
``updates`` (a round's updates: validate and store once; transform and aggregate), ``rounds`` (the
round state machine: when a round closes, pure functions), ``block_plan`` (LoLa DEFT: plan -> round
config), ``evaluation`` (score each round; plug in and report at the end), ``report`` (JSON + PNG),
``coordinator`` (the loop that ties them together and resumes after a restart).
"""

from edge_broker.coordinator.config import CoordinatorConfig, CoordinatorError

__all__ = ["CoordinatorConfig", "CoordinatorError"]
