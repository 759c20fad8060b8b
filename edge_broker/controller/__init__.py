"""FedPEAT's round controller: a PPO policy that sets each round's participants, emulator variants and steps.

``curves`` (the learning-curve model fitted to the kit's own runs, ``measure`` takes them), ``fleet`` (fleet
profiles and reward prices), ``rounds_model`` (one simulated round, pure), ``env`` (the gymnasium
environment), ``baselines``, ``ppo`` (stable-baselines3 training and the policy directory), ``evaluate``
(seeded comparisons with confidence intervals), ``variants`` (emulator variant bundles and their tensor
names), ``serve`` (the policy in a real run), ``cli`` (``deft edge controller``).
"""
