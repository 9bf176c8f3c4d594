"""Credit assignment: group-relative advantages per output slice.

Every scenario is rolled out `group` times (GRPO). All rollouts of a scenario see the same
input stream, so slice k means the same moment in each of them, and the other rollouts are a
baseline for it. A token in output slice k is credited with what happened from slice k on:

    A_i[k] = G_i[k] - mean_j G_j[k],   G_i[k] = sum of rollout i's rewards at slices >= k

(a return-to-go with a per-slice group baseline). Tokens cannot cause what came before them,
so rewards earlier in the rollout do not reach them. No division by the group's standard
deviation: the reward weights set the scale, and a group whose rollouts all did the same
gets zero advantage and costs no backward pass at all.
"""

import numpy as np


def group_advantages(rewards: list[tuple[float, ...]]) -> list[np.ndarray]:
    """One group's per-slice rewards (rollouts of one scenario, equal lengths) -> each
    rollout's per-slice advantage."""
    returns = np.array([np.cumsum(r[::-1])[::-1] for r in rewards], dtype=np.float64)
    return list(returns - returns.mean(axis=0, keepdims=True))
